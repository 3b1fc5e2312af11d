"""Prices and quotes."""

import time

CATALOG = {"widget": 2.675, "gadget": 10.125, "gizmo": 0.105}


def unit_price(sku):
    return CATALOG[sku]


def quote(sku, qty):
    """Total price in currency units, rounded to cents."""
    return round(unit_price(sku) * qty, 2)


def build_report(seconds):
    """A slow report: holds its frame on the stack while it runs."""
    deadline = time.monotonic() + seconds
    lines = 0
    while time.monotonic() < deadline:
        time.sleep(0.01)
        lines += 1
    return {"lines": lines}
