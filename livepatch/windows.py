"""Maintenance windows: the weekly stretches of wall-clock time, in the
host's local time zone (or a named zone), inside which the updater may
install patches by itself.

A window is a set of weekdays, a start and an end time ("22:00" to "02:00"
runs past midnight into the next day, counted as the start day's window).
Times are compared on the wall clock of each instant, so a window keeps its
local hours across daylight-saving changes. Every function takes the
instant as a POSIX timestamp: the updater's clock is injectable, and tests
never wait for a real time of day."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)")


class WindowError(ValueError):
    """A window as written in the configuration cannot be used."""


def parse_time(text, field: str) -> datetime.time:
    m = _TIME.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise WindowError(f"{field} must be a time of day as HH:MM (24-hour), got {str(text)[:40]!r}")
    return datetime.time(int(m.group(1)), int(m.group(2)))


def parse_days(value, field: str) -> frozenset[int]:
    """"daily", "mon-fri", "sat,sun" or a list of such: weekday numbers (Monday 0)."""
    items = value if isinstance(value, list) else [value]
    days: set[int] = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise WindowError(f"{field} must name weekdays (mon..sun, a range such as mon-fri, or daily), "
                              f"got {str(item)[:40]!r}")
        for part in item.lower().replace(" ", "").split(","):
            if part in ("daily", "every", "*"):
                days.update(range(7))
            elif "-" in part:
                a, _, b = part.partition("-")
                if a not in DAYS or b not in DAYS:
                    raise WindowError(f"{field}: {part!r} is not a range of weekdays such as mon-fri")
                i, j = DAYS.index(a), DAYS.index(b)
                days.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
            elif part in DAYS:
                days.add(DAYS.index(part))
            else:
                raise WindowError(f"{field}: {part!r} is not a weekday (mon, tue, wed, thu, fri, sat, sun, daily)")
    return frozenset(days)


@dataclass(frozen=True)
class Window:
    days: frozenset[int]
    start: datetime.time
    end: datetime.time

    @property
    def crosses_midnight(self) -> bool:
        return self.end <= self.start

    def describe(self) -> str:
        names = "daily" if len(self.days) == 7 else ",".join(DAYS[d] for d in sorted(self.days))
        return f"{names} {self.start:%H:%M}-{self.end:%H:%M}"

    def _spans(self, day: datetime.date, tz):
        """The (start, end) timestamps of this window opening on `day`, if it opens then."""
        if day.weekday() not in self.days:
            return None
        end_day = day + datetime.timedelta(days=1) if self.crosses_midnight else day
        return _stamp(day, self.start, tz), _stamp(end_day, self.end, tz)


def _stamp(day: datetime.date, at: datetime.time, tz) -> float:
    # naive datetimes are local time: .timestamp() applies the host's rules for that date
    return datetime.datetime.combine(day, at, tzinfo=tz).timestamp()


def _local_date(ts: float, tz) -> datetime.date:
    return (datetime.datetime.fromtimestamp(ts, tz) if tz else datetime.datetime.fromtimestamp(ts)).date()


class Schedule:
    """Every window of the configuration; `tz` None means the host's local zone."""

    def __init__(self, windows, tz=None):
        self.windows = tuple(windows)
        self.tz = tz

    def _spans_around(self, now: float, days_ahead: int):
        today = _local_date(now, self.tz)
        for offset in range(-1, days_ahead + 1):  # yesterday's window may run past midnight into today
            day = today + datetime.timedelta(days=offset)
            for w in self.windows:
                span = w._spans(day, self.tz)
                if span:
                    yield span

    def open_until(self, now: float) -> float | None:
        """When the window open at `now` closes, or None when none is open."""
        ends = [end for start, end in self._spans_around(now, 0) if start <= now < end]
        return max(ends) if ends else None

    def is_open(self, now: float) -> bool:
        return self.open_until(now) is not None

    def next_open(self, now: float) -> float | None:
        """`now` if a window is open, else when the next one opens (None: no windows)."""
        if self.is_open(now):
            return now
        starts = [start for start, _ in self._spans_around(now, 8) if start > now]
        return min(starts) if starts else None

    def describe(self) -> list[str]:
        return [w.describe() for w in self.windows]


def window_from(entry, field: str) -> Window:
    """One `[[window]]` table of the configuration: days, start, end."""
    if not isinstance(entry, dict):
        raise WindowError(f"{field} must be a table with days, start and end")
    unknown = sorted(set(entry) - {"days", "start", "end"})
    if unknown:
        raise WindowError(f"{field} has unknown key {unknown[0]!r} (a window has days, start and end)")
    for key in ("start", "end"):
        if key not in entry:
            raise WindowError(f"{field} needs {key} = \"HH:MM\"")
    start, end = parse_time(entry["start"], f"{field}.start"), parse_time(entry["end"], f"{field}.end")
    if start == end:
        raise WindowError(f"{field}: start and end are both {start:%H:%M}; a window needs a length")
    return Window(parse_days(entry.get("days", "daily"), f"{field}.days"), start, end)


def local_iso(ts: float, tz=None) -> str:
    """An instant as the operator reads it: local wall time with its UTC offset."""
    return datetime.datetime.fromtimestamp(ts, tz).astimezone(tz).isoformat(timespec="seconds")
