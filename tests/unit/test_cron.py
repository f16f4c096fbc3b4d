"""Cron expressions, intervals and the catch-up of missed ticks (pure: no clock, no broker)."""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import pytest

from qtasks.cron import Cron, Every
from qtasks.periodic import MAX_CATCH_UP, Schedule, latest_ticks, missed, tick_uuid

UTC = datetime.UTC


def at(*parts: int, tz: Any = UTC) -> float:
    return datetime.datetime(*parts, tzinfo=tz).timestamp()


def ticks(when: Cron | Every, start: float, n: int) -> list[str]:
    out, t = [], start
    tz = when.tz if isinstance(when, Cron) else UTC
    for _ in range(n):
        t = when.next_after(t)
        out.append(datetime.datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d %H:%M %a"))
    return out


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("*/15 * * * *", ["2026-03-28 23:15 Sat", "2026-03-28 23:30 Sat", "2026-03-28 23:45 Sat"]),
        ("0 9 * * mon-fri", ["2026-03-30 09:00 Mon", "2026-03-31 09:00 Tue", "2026-04-01 09:00 Wed"]),
        ("30 8 1 * *", ["2026-04-01 08:30 Wed", "2026-05-01 08:30 Fri", "2026-06-01 08:30 Mon"]),
        # both day fields restricted: either matches (Vixie cron)
        ("0 0 1,15 * sun", ["2026-03-29 00:00 Sun", "2026-04-01 00:00 Wed", "2026-04-05 00:00 Sun"]),
        ("0 0 29 2 *", ["2028-02-29 00:00 Tue", "2032-02-29 00:00 Sun", "2036-02-29 00:00 Fri"]),
        ("@hourly", ["2026-03-29 00:00 Sun", "2026-03-29 01:00 Sun", "2026-03-29 02:00 Sun"]),
        ("@weekly", ["2026-03-29 00:00 Sun", "2026-04-05 00:00 Sun", "2026-04-12 00:00 Sun"]),
        ("0 12 * jan,jul 7", ["2026-07-05 12:00 Sun", "2026-07-12 12:00 Sun", "2026-07-19 12:00 Sun"]),
        ("5-10/5 1 * * *", ["2026-03-29 01:05 Sun", "2026-03-29 01:10 Sun", "2026-03-30 01:05 Mon"]),
        ("59 23 31 12 *", ["2026-12-31 23:59 Thu", "2027-12-31 23:59 Fri", "2028-12-31 23:59 Sun"]),
    ],
)
def test_cron_gives_the_next_ticks(expression: str, expected: list[str]) -> None:
    assert ticks(Cron(expression), at(2026, 3, 28, 23, 0), 3) == expected


def test_a_tick_is_strictly_after_the_time_given() -> None:
    cron = Cron("*/5 * * * *")
    assert cron.next_after(at(2026, 1, 1, 0, 5)) == at(2026, 1, 1, 0, 10)
    assert cron.next_after(at(2026, 1, 1, 0, 4, 59)) == at(2026, 1, 1, 0, 5)


def test_a_time_zone_and_its_daylight_saving_changes() -> None:
    paris = "Europe/Paris"
    # 2026-03-29 skips 02:00-03:00 in Paris: 02:30 comes at 03:30; other days at 02:30 local.
    assert ticks(Cron("30 2 * * *", paris), at(2026, 3, 28, 12, 0), 3) == [
        "2026-03-29 03:30 Sun",
        "2026-03-30 02:30 Mon",
        "2026-03-31 02:30 Tue",
    ]
    # 2026-10-25 repeats 02:00-03:00: a tick at 02:30 comes once.
    once = [Cron("30 2 * * *", paris).next_after(at(2026, 10, 24, 12, 0))]
    once.append(Cron("30 2 * * *", paris).next_after(once[0]))
    assert once[1] - once[0] == 25 * 3600  # the next day, 25 hours on
    assert Cron("0 9 * * *", "America/New_York").next_after(at(2026, 6, 1, 0, 0)) == at(2026, 6, 1, 13, 0)


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("* * * *", "has 4 fields; it takes 5"),
        ("60 * * * *", "60 is outside the minute field (0-59)"),
        ("* 24 * * *", "24 is outside the hour field"),
        ("* * 0 * *", "0 is outside the day of month field"),
        ("* * * 13 *", "13 is outside the month field"),
        ("* * * foo *", "'foo' is not a value of the month field"),
        ("*/0 * * * *", "bad step '0'"),
        ("10-5 * * * *", "runs backwards"),
        ("0 0 30 2 *", "names no day that exists"),
    ],
)
def test_a_bad_cron_expression_says_what_is_wrong(expression: str, error: str) -> None:
    with pytest.raises(ValueError, match="cron expression") as caught:
        Cron(expression)
    assert error in str(caught.value)


def test_bad_time_zones_and_types() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Base'"):
        Cron("* * * * *", "Mars/Base")
    with pytest.raises(TypeError):
        Cron(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1 second"):
        Every(0.5)
    with pytest.raises(TypeError):
        Every(True)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("0 0 1 3 */7", "2037-03-01T00:00:00+00:00"),  # March 1st on a Sunday: 11 years away
        ("0 0 29 2 1", "2027-02-01T00:00:00+00:00"),  # Feb 29 or a Monday (one day field is not *)
        ("0 0 29 2 */7", "2032-02-29T00:00:00+00:00"),  # Feb 29 on a Sunday
    ],
)
def test_a_rare_day_is_found_however_far_it_is(expression: str, expected: str) -> None:
    start = datetime.datetime(2026, 11, 27, tzinfo=datetime.UTC).timestamp()
    tick = Cron(expression).next_after(start)
    assert datetime.datetime.fromtimestamp(tick, datetime.UTC).isoformat() == expected


def test_a_pytz_style_zone_is_used_by_its_name() -> None:
    class PytzLike(datetime.tzinfo):  # what pytz gives: localize() needed, a first offset of LMT
        zone = "Europe/Paris"

        def localize(self, dt: datetime.datetime) -> datetime.datetime:
            raise AssertionError("not used")

        def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(minutes=9, seconds=21)

        def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(0)

    start = datetime.datetime(2026, 7, 1, tzinfo=datetime.UTC).timestamp()
    tick = Cron("0 9 * * *", PytzLike()).next_after(start)
    assert datetime.datetime.fromtimestamp(tick, datetime.UTC).isoformat() == "2026-07-01T07:00:00+00:00"


@pytest.mark.parametrize("step", [13.37, 1.76, 1.01, 2.3, 7.77, 29.99, 3600.5])
def test_a_fractional_step_gives_each_tick_once_however_it_is_reached(step: float) -> None:
    every = Every(step)
    start = 1_764_000_000.123
    chain = [every.next_after(start)]
    for _ in range(2000):
        chain.append(every.next_after(chain[-1]))
    first = every.first_after(start)
    assert chain == [(first + i) * step for i in range(len(chain))]  # one float per tick, never a near copy
    assert all(b - a > step / 2 for a, b in itertools.pairwise(chain))
    # a takeover's catch-up lists the same ticks (the same uuids) as the ticker made one by one
    kept, passed = latest_ticks(every, start, chain[-1], MAX_CATCH_UP)
    assert kept == chain[-MAX_CATCH_UP:] and passed == len(chain) - MAX_CATCH_UP
    assert every.next_after(chain[5] - 1e-3) == chain[5] and every.next_after(chain[5]) == chain[6]


def test_every_ticks_at_whole_multiples_since_the_epoch() -> None:
    every = Every(30)
    assert every.next_after(at(2026, 1, 1, 0, 0, 10)) == at(2026, 1, 1, 0, 0, 30)
    assert every.next_after(at(2026, 1, 1, 0, 0, 30)) == at(2026, 1, 1, 0, 1, 0)


def test_a_schedule_is_checked_when_it_is_made() -> None:
    with pytest.raises(TypeError, match="cron= or every="):
        Schedule.of(cron=None, every=None, tz=None, catch_up="latest", args=(), kwargs=None)
    with pytest.raises(TypeError, match="cron= or every="):
        Schedule.of(cron="* * * * *", every=5, tz=None, catch_up="latest", args=(), kwargs=None)
    with pytest.raises(ValueError, match="catch_up must be"):
        Schedule.of(cron=None, every=5, tz=None, catch_up="some", args=(), kwargs=None)
    with pytest.raises(TypeError, match="tz= goes with cron="):
        Schedule.of(cron=None, every=5, tz="UTC", catch_up="all", args=(), kwargs=None)
    with pytest.raises(TypeError, match="args= takes a tuple or list"):
        Schedule.of(cron=None, every=5, tz=None, catch_up="all", args="ab", kwargs=None)
    with pytest.raises((TypeError, ValueError)):
        Schedule.of(cron=None, every=5, tz=None, catch_up="all", args=(object(),), kwargs=None)


def test_missed_ticks_within_the_grace_always_run_and_the_rest_follow_catch_up() -> None:
    every = Every(10)
    last, now, grace = 1000.0, 2000.0, 100.0
    # ticks 1010..1100 fall within the grace (after last, the later of last and alive); 1110..2000 do not.
    within = [1000.0 + 10 * i for i in range(1, 11)]
    after = [1100.0 + 10 * i for i in range(1, 91)]
    assert missed(every, last, 0.0, now, grace, "skip") == (within, 90)
    assert missed(every, last, 0.0, now, grace, "latest") == ([*within, 2000.0], 89)
    assert missed(every, last, 0.0, now, grace, "all") == ([*within, *after], 0)
    # a later sign of life moves the grace on
    assert missed(every, last, 1900.0, now, grace, "skip") == ([1000.0 + 10 * i for i in range(1, 101)], 0)
    # nothing missed
    assert missed(every, 1995.0, 1995.0, now, grace, "all") == ([2000.0], 0)
    assert missed(every, 2000.0, 2000.0, now, grace, "all") == ([], 0)


def test_catch_up_all_keeps_at_most_the_latest_thousand() -> None:
    kept, passed = missed(Every(1), 0.0, 0.0, 5000.0, 10.0, "all")
    assert len(kept) == 10 + MAX_CATCH_UP and kept[-1] == 5000.0 and kept[10] == 5000.0 - MAX_CATCH_UP + 1
    assert passed == 5000 - 10 - MAX_CATCH_UP


def test_a_tick_has_the_same_uuid_in_every_worker_and_another_for_each_tick() -> None:
    assert tick_uuid("app", "beat", 60.0) == tick_uuid("app", "beat", 60.0)
    assert len({tick_uuid("app", "beat", 60.0), tick_uuid("app", "beat", 70.0), tick_uuid("other", "beat", 60.0)}) == 3


def test_the_night_the_clocks_go_forward_loses_no_tick() -> None:
    paris = "Europe/Paris"  # 2024-03-31: 02:00 -> 03:00
    quarter = Cron("*/15 2 * * *", paris)
    assert ticks(quarter, at(2024, 3, 30, 23, 0), 5) == [
        "2024-03-31 03:00 Sun",  # 02:00, 02:15, 02:30, 02:45 happen an hour on
        "2024-03-31 03:15 Sun",
        "2024-03-31 03:30 Sun",
        "2024-03-31 03:45 Sun",
        "2024-04-01 02:00 Mon",
    ]
    # a worker that asks between 03:00 and 03:30 still gets that day's 02:30 (at 03:30)
    half = Cron("30 2 * * *", paris)
    after = datetime.datetime(2024, 3, 31, 3, 10, tzinfo=datetime.timezone(datetime.timedelta(hours=2))).timestamp()
    assert half.next_after(after) == after + 20 * 60
    # a half-hour shift (Lord Howe, 2024-10-06: 02:00 -> 02:30)
    seven = Cron("*/7 * * * *", "Australia/Lord_Howe")
    start = datetime.datetime(2024, 10, 6, 1, 50, tzinfo=seven.tz).timestamp()
    got = ticks(seven, start, 6)
    assert got[:2] == ["2024-10-06 01:56 Sun", "2024-10-06 02:30 Sun"]  # 02:03, 02:10, ... 02:24 come at 02:33 on
    assert len(got) == len(set(got))


def test_a_day_field_that_starts_with_a_star_makes_both_fields_count() -> None:
    # as Vixie cron: "*/2" in day-of-month with a weekday means odd days that are Mondays
    assert ticks(Cron("0 0 */2 * 1"), at(2026, 3, 1, 0, 0), 3) == [
        "2026-03-09 00:00 Mon",
        "2026-03-23 00:00 Mon",
        "2026-04-13 00:00 Mon",
    ]
    with pytest.raises(ValueError, match="not a time between 1970"):
        Cron("* * * * *").next_after(1e12)


def test_a_long_gap_of_a_cron_schedule_catches_up_its_latest_ticks_quickly() -> None:
    now = at(2026, 6, 1, 12, 0, 30)
    last = now - 200 * 86400
    started = datetime.datetime.now().timestamp()
    kept, passed = missed(Cron("* * * * *"), last, last, now, 60.0, "latest")
    assert kept[-1] == at(2026, 6, 1, 12, 0) and passed == -1  # the latest tick, not one 200 days old
    assert len(kept) == 1 + 1  # the one tick within the grace of the last sign, and the latest
    kept, _ = missed(Cron("*/5 * * * *"), last, last, now, 60.0, "all")
    assert len(kept) == MAX_CATCH_UP and kept[-1] == at(2026, 6, 1, 12, 0)  # none within the minute of grace
    assert kept[0] == at(2026, 6, 1, 12, 0) - 5 * 60 * (MAX_CATCH_UP - 1)
    assert datetime.datetime.now().timestamp() - started < 5.0
