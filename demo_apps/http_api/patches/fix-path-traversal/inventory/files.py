"""Serving product documents from the data directory."""

import os

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def document_path(name):
    docs = os.path.realpath(os.path.join(DATA_DIR, "docs"))
    path = os.path.realpath(os.path.join(docs, name))
    if os.path.commonpath([docs, path]) != docs:
        return None  # outside the documents directory: refuse ../ and absolute names
    return path


def read_document(name):
    path = document_path(name)
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read()
