"""URLs of the shop site. The views module is imported on the first request
that needs it, as large Django sites often arrange (startup checks import
this file, not the views)."""

import importlib
import os

from django.http import JsonResponse
from django.urls import path


def lazy(dotted):
    module, name = dotted.rsplit(".", 1)

    def view(request, *args, **kwargs):
        return getattr(importlib.import_module(module), name)(request, *args, **kwargs)
    view.__name__ = name
    return view


def health(request):
    return JsonResponse({"ok": True, "pid": os.getpid()})


urlpatterns = [
    path("health", health),
    path("login", lazy("shopsite.views.login")),
    path("orders/<int:number>", lazy("shopsite.views.order")),
]
