"""The in-process agent of livepatch (installed as livepatch.agent)."""
