"""Settings for the shop site: no database, no apps, no middleware."""

SECRET_KEY = "demo-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "shopsite.urls"
INSTALLED_APPS = []
MIDDLEWARE = []
DATABASES = {}
USE_TZ = True
WSGI_APPLICATION = "shopsite.wsgi.application"
LOGGING_CONFIG = None
