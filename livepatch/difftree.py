"""`build BASELINE --diff fix.patch`: the patched tree is the baseline with
an upstream fix (a unified diff, as `git diff` or `diff -ru` write it)
applied, as kpatch-build takes a patch.

The baseline is copied into a private temporary directory (mode 0700,
removed afterwards) and the diff applied there exactly: every context and
removed line must match (a hunk may sit at another line, as when a later
release moved it, but never with fuzz). Paths are relative to the
baseline after stripping the `a/`/`b/` prefix (or none for plain
`diff -ru` output) and never leave it; links are never written through.
A diff that does not apply is refused in one line naming the file and
hunk; nothing in the trees is executed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

MAX_DIFF = 16 << 20
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class DiffRefused(ValueError):
    """The diff cannot be read or does not apply to the baseline."""


def _path(header: str) -> str | None:
    name = header.split("\t")[0].strip()
    if name == "/dev/null":
        return None
    return name


def parse(text: str) -> list[dict]:
    """[{"old", "new", "hunks": [(old start, [(op, line)])]}] of a unified diff."""
    files, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        if lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            entry = {"old": _path(lines[i][4:]), "new": _path(lines[i + 1][4:]), "hunks": []}
            files.append(entry)
            i += 2
            while i < len(lines) and (m := _HUNK.match(lines[i])):
                old_count = int(m.group(2) if m.group(2) is not None else 1)
                new_count = int(m.group(4) if m.group(4) is not None else 1)
                body, i = [], i + 1
                while (old_count > 0 or new_count > 0) and i < len(lines):
                    line = lines[i]
                    if line.startswith("\\"):  # "\ No newline at end of file"
                        if body:
                            body[-1] = (body[-1][0], body[-1][1].rstrip("\r\n"))
                        i += 1
                        continue
                    op, content = (line[0], line[1:]) if line[:1] in (" ", "-", "+") else (" ", line if line.strip() == "" else None)
                    if content is None:
                        raise DiffRefused(f"{entry['new'] or entry['old']}: hunk at line {m.group(1)} is cut short")
                    body.append((op, content))
                    old_count -= op != "+"
                    new_count -= op != "-"
                    i += 1
                if i < len(lines) and lines[i].startswith("\\"):
                    body[-1] = (body[-1][0], body[-1][1].rstrip("\r\n"))
                    i += 1
                if old_count > 0 or new_count > 0:
                    raise DiffRefused(f"{entry['new'] or entry['old']}: hunk at line {m.group(1)} is cut short")
                entry["hunks"].append((int(m.group(1)), body))
            continue
        i += 1
    if not files:
        raise DiffRefused("not a unified diff (no ---/+++ file headers)")
    return files


def _strip(name: str, level: int) -> str:
    parts = name.split("/")
    return "/".join(parts[level:])


def _level(files, root: str) -> int:
    """How many leading path parts to strip (as patch -p): the first of 1
    (git's a/ b/), 0, 2, 3 under which every file the diff changes is in
    the baseline (a diff made at a repository's root applies to its
    package directory too)."""
    for level in (1, 0, 2, 3):
        if all(_strip(f["old"] or f["new"], level) for f in files) and \
                all(f["old"] is None or os.path.isfile(os.path.join(root, _strip(f["old"], level))) for f in files):
            return level
    return 1


def _safe(root: str, rel: str) -> str:
    if not rel or rel.startswith("/") or any(p in ("..", "") for p in rel.split("/")):
        raise DiffRefused(f"{rel or '(empty)'}: the diff names a path outside the baseline tree")
    path = os.path.join(root, rel)
    parent = root
    for part in rel.split("/")[:-1]:
        parent = os.path.join(parent, part)
        if os.path.islink(parent):
            raise DiffRefused(f"{rel}: a directory on the way is a link; the diff is not applied through links")
    if os.path.islink(path):
        raise DiffRefused(f"{rel}: is a link in the baseline; the diff is not applied through links")
    return path


def _apply_hunks(lines: list[str], hunks, rel: str) -> list[str]:
    out, offset = list(lines), 0
    for start, body in hunks:
        old = [c for op, c in body if op != "+"]
        new = [c for op, c in body if op != "-"]
        want = max(start - 1 + offset, 0) if old else min(max(start + offset, 0), len(out))
        at = None
        for delta in sorted(range(-len(out) - 1, len(out) + 2), key=abs):  # nearest match first
            pos = want + delta
            if 0 <= pos <= len(out) - len(old) and out[pos:pos + len(old)] == old:
                at = pos
                break
        if at is None:
            raise DiffRefused(f"{rel}: hunk @@ -{start} does not apply to the baseline (its lines are not there)")
        out[at:at + len(old)] = new
        offset += len(new) - len(old) + (at - want)
    return out


def apply(root: str, text: str) -> list[str]:
    """Apply the diff to the tree at `root` (a private copy); the files changed."""
    files = parse(text)
    level = _level(files, root)
    changed = []
    for f in files:
        rel = _strip(f["new"] or f["old"], level)
        path = _safe(root, rel)
        if f["old"] is None:
            if os.path.lexists(path):
                raise DiffRefused(f"{rel}: the diff creates it, but the baseline has it already")
            lines = []
        else:
            try:
                with open(path, encoding="utf-8", newline="") as fh:
                    lines = fh.read().splitlines(keepends=True)
            except FileNotFoundError:
                raise DiffRefused(f"{rel}: the diff changes it, but the baseline has no such file") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise DiffRefused(f"{rel}: cannot read it from the baseline ({exc})") from None
        result = _apply_hunks(lines, f["hunks"], rel)
        if f["new"] is None:
            if result:
                raise DiffRefused(f"{rel}: the diff deletes it, but the baseline file has other lines")
            os.unlink(path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as fh:
                fh.write("".join(result))
        changed.append(rel)
    return changed


def read_diff(path: str) -> str:
    from .operatorfile import read_bounded
    try:
        data = read_bounded(path, MAX_DIFF, "--diff")
    except ValueError as exc:
        raise DiffRefused(str(exc)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DiffRefused(f"--diff {path}: not UTF-8 text (byte {exc.start})") from None


@contextlib.contextmanager
def patched_copy(baseline: str, diff_path: str):
    """A private copy of `baseline` with the diff applied; removed on exit."""
    text = read_diff(diff_path)
    if not os.path.isdir(baseline):
        raise DiffRefused(f"--diff needs the baseline tree as a directory; {baseline} is not one")
    work = tempfile.mkdtemp(prefix="livepatch-diff-")  # 0700, a fresh name: no race with other users
    try:
        root = os.path.join(work, os.path.basename(os.path.abspath(baseline)) or "tree")
        shutil.copytree(baseline, root, symlinks=True)
        try:
            apply(root, text)
        except DiffRefused as exc:
            raise DiffRefused(f"--diff {diff_path} does not apply to {baseline}: {exc}") from None
        yield root
    finally:
        shutil.rmtree(work, ignore_errors=True)
