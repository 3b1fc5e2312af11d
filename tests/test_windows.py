"""Maintenance windows: open or not at an instant, when the next one opens,
in a named zone (daylight-saving included) and in the host's local time."""

import datetime
import time
import zoneinfo

import pytest

from livepatch import windows
from livepatch.windows import Schedule, WindowError, window_from

PARIS = zoneinfo.ZoneInfo("Europe/Paris")


def at(y, mo, d, h, mi, tz=PARIS) -> float:
    return datetime.datetime(y, mo, d, h, mi, tzinfo=tz).timestamp()


def schedule(*entries, tz=PARIS) -> Schedule:
    return Schedule([window_from(e, f"window[{i}]") for i, e in enumerate(entries)], tz)


def test_weekday_window_opens_and_closes_on_the_local_wall_clock():
    s = schedule({"days": "mon-fri", "start": "02:00", "end": "04:30"})
    # 2026-03-02 is a Monday
    assert not s.is_open(at(2026, 3, 2, 1, 59))
    assert s.is_open(at(2026, 3, 2, 2, 0))
    assert s.open_until(at(2026, 3, 2, 3, 0)) == at(2026, 3, 2, 4, 30)
    assert not s.is_open(at(2026, 3, 2, 4, 30))
    assert s.next_open(at(2026, 3, 2, 5, 0)) == at(2026, 3, 3, 2, 0)
    # Friday evening: the next one is on Monday
    assert s.next_open(at(2026, 3, 6, 12, 0)) == at(2026, 3, 9, 2, 0)
    assert not s.is_open(at(2026, 3, 7, 3, 0))  # Saturday


def test_window_past_midnight_belongs_to_its_start_day():
    s = schedule({"days": "sat", "start": "22:00", "end": "02:00"})
    assert s.is_open(at(2026, 3, 7, 23, 0))       # Saturday night
    assert s.is_open(at(2026, 3, 8, 1, 59))       # early Sunday, same window
    assert s.open_until(at(2026, 3, 8, 1, 0)) == at(2026, 3, 8, 2, 0)
    assert not s.is_open(at(2026, 3, 8, 23, 0))   # Sunday night is not Saturday's
    assert not s.is_open(at(2026, 3, 7, 1, 0))    # early Saturday belongs to Friday's night


def test_daylight_saving_keeps_local_hours():
    # Europe/Paris moves from UTC+1 to UTC+2 on Sunday 2026-03-29 at 02:00
    s = schedule({"days": "daily", "start": "03:00", "end": "04:00"})
    before, after = s.next_open(at(2026, 3, 28, 12, 0)), s.next_open(at(2026, 3, 29, 12, 0))
    assert datetime.datetime.fromtimestamp(before, PARIS).hour == 3
    assert datetime.datetime.fromtimestamp(after, PARIS).hour == 3
    assert after - before == 86400  # 03:00 Sunday to 03:00 Monday, both after the change
    assert s.next_open(at(2026, 3, 28, 12, 0)) - at(2026, 3, 28, 12, 0) == 14 * 3600  # a 23-hour day


def test_host_local_time_when_no_zone_is_named():
    now = time.time()
    local = datetime.datetime.fromtimestamp(now)
    start = (local - datetime.timedelta(minutes=30)).strftime("%H:%M")
    end = (local + datetime.timedelta(minutes=30)).strftime("%H:%M")
    s = schedule({"days": "daily", "start": start, "end": end}, tz=None)
    assert s.is_open(now)
    assert s.next_open(now) == now
    shut = schedule({"days": "daily", "start": (local + datetime.timedelta(hours=2)).strftime("%H:%M"),
                     "end": (local + datetime.timedelta(hours=3)).strftime("%H:%M")}, tz=None)
    assert not shut.is_open(now)
    assert 3600 < shut.next_open(now) - now <= 2 * 3600 + 60


def test_several_windows_and_none():
    s = schedule({"days": "sat,sun", "start": "10:00", "end": "11:00"}, {"days": ["wed"], "start": "01:00", "end": "02:00"})
    assert s.next_open(at(2026, 3, 2, 12, 0)) == at(2026, 3, 4, 1, 0)   # Monday -> Wednesday
    assert s.describe() == ["sat,sun 10:00-11:00", "wed 01:00-02:00"]
    assert Schedule([]).next_open(time.time()) is None
    assert not Schedule([]).is_open(time.time())


@pytest.mark.parametrize("entry, message", [
    ({"start": "2:00"}, "needs end"),
    ({"start": "25:00", "end": "01:00"}, "window[0].start must be a time of day as HH:MM"),
    ({"start": "01:00", "end": "01:00"}, "needs a length"),
    ({"days": "someday", "start": "01:00", "end": "02:00"}, "'someday' is not a weekday"),
    ({"days": "mon-xyz", "start": "01:00", "end": "02:00"}, "not a range of weekdays"),
    ({"days": 3, "start": "01:00", "end": "02:00"}, "must name weekdays"),
    ({"start": "01:00", "end": "02:00", "length": "1h"}, "unknown key 'length'"),
    ("02:00-04:00", "must be a table"),
])
def test_bad_windows_are_one_clear_line(entry, message):
    with pytest.raises(WindowError) as exc:
        window_from(entry, "window[0]")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_wrapping_day_ranges():
    assert windows.parse_days("fri-mon", "d") == {4, 5, 6, 0}
    assert windows.parse_days(["daily"], "d") == set(range(7))
