"""Where a user is sent after logging in: back to the page they came from,
as long as it is on this site."""


def safe_next(target, default="/"):
    """The redirect target for `?next=`: a path on this site, else `default`."""
    if not target or not target.startswith("/"):
        return default
    return target
