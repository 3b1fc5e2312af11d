"""The exploit check shared by the two xmlattr cases (one filter, two fixes)."""

import jinja2


def xmlattr_injects(key: str, marker: str):
    """Whether a dict key given to xmlattr ends up as markup of its own."""
    env = jinja2.Environment(autoescape=True)
    try:
        out = env.from_string("<p{{ d|xmlattr }}>").render(d={key: "x"})
    except ValueError as exc:
        return False, f"refused: {exc}"
    return marker in out, out
