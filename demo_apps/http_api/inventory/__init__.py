"""A small inventory service: a threaded HTTP JSON API (demo for livepatch)."""
