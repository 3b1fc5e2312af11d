"""The shop's views."""

import json
import os

from django.http import HttpResponseRedirect, JsonResponse

from shop import links


def login(request):
    target = links.safe_next(request.GET.get("next"))
    body = json.dumps({"redirect": target, "pid": os.getpid()})
    return HttpResponseRedirect(target, content=body, content_type="application/json")


def order(request, number):
    return JsonResponse({"order": number, "status": "shipped", "pid": os.getpid()})
