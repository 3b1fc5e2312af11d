"""The shop as a Django project (no database)."""
