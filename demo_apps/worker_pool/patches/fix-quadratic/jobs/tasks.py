"""The work: de-duplicating the tags of an order."""


def unique_tags(tags):
    """Tags in first-seen order without repeats."""
    return list(dict.fromkeys(tags))  # one hash lookup per tag


def process(job):
    return {"id": job["id"], "tags": len(unique_tags(job["tags"]))}
