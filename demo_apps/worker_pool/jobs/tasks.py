"""The work: de-duplicating the tags of an order."""


def unique_tags(tags):
    """Tags in first-seen order without repeats."""
    out = []
    for tag in tags:
        if tag not in out:  # a list scan per tag: quadratic
            out.append(tag)
    return out


def process(job):
    return {"id": job["id"], "tags": len(unique_tags(job["tags"]))}
