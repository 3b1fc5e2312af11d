"""Jobs the pool workers run (shop.jobs hands them out)."""

import os

from . import links


def check_link(target):
    """The login redirect for `target`, computed in a worker, and that worker's PID."""
    return links.safe_next(target), os.getpid()
