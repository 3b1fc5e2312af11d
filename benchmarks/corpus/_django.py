"""Minimal Django settings for the Django cases (no database, no apps beyond humanize)."""
import django
from django.conf import settings

if not settings.configured:
    settings.configure(USE_I18N=False, USE_L10N=False, INSTALLED_APPS=["django.contrib.humanize"])
    django.setup()
