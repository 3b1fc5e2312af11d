"""Prices and quotes."""

import time
from decimal import ROUND_HALF_UP, Decimal

CATALOG = {"widget": 2.675, "gadget": 10.125, "gizmo": 0.105}


def unit_price(sku):
    return CATALOG[sku]


def quote(sku, qty):
    """Total price in currency units, rounded to cents."""
    # binary floats round 2.675 down; prices round half up, in decimal
    total = Decimal(str(unit_price(sku))) * qty
    return float(total.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def build_report(seconds):
    """A slow report: holds its frame on the stack while it runs."""
    deadline = time.monotonic() + seconds
    lines = 0
    while time.monotonic() < deadline:
        time.sleep(0.01)
        lines += 1
    return {"lines": lines}
