"""Serving product documents from the data directory."""

import os

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def document_path(name):
    return os.path.join(DATA_DIR, "docs", name)


def read_document(name):
    path = document_path(name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read()
