"""Cron expressions and intervals: when a periodic task's next tick is (pure, no clock of its own).

A cron expression has five fields, ``minute hour day-of-month month day-of-week``:

- ``*``, a number, a range ``a-b``, a list ``a,b,c``, and steps ``*/n`` or ``a-b/n``;
- months ``1-12`` or ``jan``-``dec``; days of the week ``0-7`` (0 and 7 are Sunday) or
  ``sun``-``sat``;
- ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``), ``@hourly``.

As in Vixie cron, when both day fields are restricted a day matches either of them; when
either starts with ``*`` (``*`` itself, or ``*/2``), a day must match both.
Times are wall-clock times of the schedule's time zone (UTC unless one is given): in a
day that skips an hour, a tick in it comes an hour on (02:30 becomes 03:30), unless that
is a tick already; in one that repeats an hour, a tick comes once, at its first pass.
"""

from __future__ import annotations

import datetime
import math
import zoneinfo
from typing import Final

_FIELDS: Final = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_MONTHS: Final = {
    m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)
}
_DAYS: Final = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_ALIASES: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: How far ahead a next tick is looked for: 400 years, the Gregorian calendar's cycle, in
#: which every date that exists falls on every day of the week (Feb 29 on a Sunday too).
_HORIZON_DAYS: Final = 146_097
#: More than any daylight-saving shift of wall-clock time (the largest in use is 1 hour).
_SHIFT: Final = datetime.timedelta(hours=3)


class Cron:
    """A parsed cron expression in a time zone; ``next_after(t)`` is the first tick after Unix time ``t``."""

    def __init__(self, expression: str, tz: str | datetime.tzinfo | None = None) -> None:
        if not isinstance(expression, str):
            raise TypeError(f"a cron expression is a string, got {type(expression).__name__}")
        self.expression = expression
        text = _ALIASES.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(
                f"cron expression {expression!r} has {len(parts)} fields; it takes 5: minute hour day-of-month month "
                "day-of-week (or @hourly, @daily, ...)"
            )
        fields = [_field(part, *spec, expression) for part, spec in zip(parts, _FIELDS, strict=True)]
        self.minutes, self.hours, self.days, self.months, weekdays = fields
        self.weekdays = frozenset(d % 7 for d in weekdays)
        # As cron does: a day field that starts with "*" (also "*/2") makes a day match both fields.
        self._both_days = parts[2].startswith("*") or parts[4].startswith("*")
        self._hours = sorted(self.hours)
        self._minutes = sorted(self.minutes)
        self.tz = _zone(tz)
        if not any(day <= _MONTH_DAYS[month] for month in self.months for day in self.days) and self._both_days:
            raise ValueError(f"cron expression {expression!r} names no day that exists")

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}, tz={self.tz})"

    def _day_matches(self, day: datetime.date) -> bool:
        if day.month not in self.months:
            return False
        in_month = day.day in self.days
        in_week = (day.isoweekday() % 7) in self.weekdays
        return (in_month and in_week) if self._both_days else (in_month or in_week)

    def next_after(self, t: float) -> float:
        """The first tick strictly after Unix time ``t``.

        Wall-clock times are turned into instants before they are compared: a time in a
        skipped hour lands an hour on, after later wall-clock times of that day. So the
        earliest instant after ``t`` is looked for among the candidates from a few hours
        of wall-clock time before ``t`` on, until one is found and no later one can beat it.
        """
        if not math.isfinite(t) or not 0.0 <= t < 1e11:
            raise ValueError(f"no cron tick after {t!r}: not a time between 1970 and the year 5138")
        tz = self.tz
        aware = datetime.datetime.fromtimestamp(t, tz)
        local = aware.replace(tzinfo=None, second=0, microsecond=0)
        # Only a skipped hour just before t can hold a wall-clock time whose instant is after t.
        shifted = datetime.datetime.fromtimestamp(max(t - _SHIFT.total_seconds(), 0.0), tz).utcoffset()
        start = local - _SHIFT if shifted != aware.utcoffset() else local
        best = best_wall = None
        day = start.date()
        for _ in range(_HORIZON_DAYS):
            if self._day_matches(day):
                first = day == start.date()
                for hour in self._hours:
                    if first and hour < start.hour:
                        continue
                    for minute in self._minutes:
                        if first and hour == start.hour and minute < start.minute:
                            continue
                        wall = datetime.datetime.combine(day, datetime.time(hour, minute))
                        if best_wall is not None and wall > best_wall + _SHIFT:
                            return best  # type: ignore[return-value]
                        tick = _instant(wall, tz)
                        if tick > t and (best is None or tick < best):
                            best, best_wall = tick, wall
                            if datetime.datetime.fromtimestamp(tick, tz).replace(tzinfo=None) == wall:
                                return tick  # not in a skipped hour: no later wall-clock time comes sooner
            day += datetime.timedelta(days=1)
            if best_wall is not None and datetime.datetime.combine(day, datetime.time()) > best_wall + _SHIFT:
                return best  # type: ignore[return-value]
        raise ValueError(f"cron expression {self.expression!r} has no tick in the next 400 years")


class Every:
    """A fixed interval: ticks at whole multiples of ``seconds`` since the Unix epoch (every worker agrees)."""

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"every= takes a number of seconds, got {type(seconds).__name__}")
        if not (math.isfinite(seconds) and seconds >= 1.0):
            raise ValueError(f"every= takes at least 1 second, got {seconds!r}")
        self.seconds = float(seconds)

    def __repr__(self) -> str:
        return f"Every({self.seconds})"

    def next_after(self, t: float) -> float:
        """The first tick strictly after Unix time ``t``."""
        return self.first_after(t) * self.seconds

    def first_after(self, t: float) -> int:
        """The number of the first tick strictly after ``t``: the least ``n`` with ``n * seconds > t``.

        A tick is always ``n * seconds`` computed the same way (its uuid is made from it),
        never a sum of steps: with a fractional step, ``t / seconds`` can round either way.
        """
        step = self.seconds
        n = math.floor(t / step) + 1
        while n * step <= t:
            n += 1
        while (n - 1) * step > t:
            n -= 1
        return n


_MONTH_DAYS: Final = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}


def _zone(tz: str | datetime.tzinfo | None) -> datetime.tzinfo:
    if tz is None:
        return datetime.UTC
    if isinstance(tz, datetime.tzinfo):
        if hasattr(tz, "localize"):  # pytz: its zones need localize(), which replace(tzinfo=) skips
            name = getattr(tz, "zone", None)
            if not isinstance(name, str):
                raise TypeError(f"tz= cannot use the pytz zone {tz!r}: give its IANA name, such as 'Europe/Paris'")
            return _zone(name)
        return tz
    if not isinstance(tz, str):
        raise TypeError(f"tz= takes a time zone name or a tzinfo, got {type(tz).__name__}")
    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz!r} (an IANA name such as 'Europe/Paris')") from None


def _instant(wall: datetime.datetime, tz: datetime.tzinfo) -> float:
    """Unix time of a wall-clock time in ``tz``: its first pass if repeated, an hour on if skipped (PEP 495, fold 0)."""
    return wall.replace(tzinfo=tz, fold=0).timestamp()


def _field(text: str, name: str, low: int, high: int, expression: str) -> frozenset[int]:
    values: set[int] = set()
    names = _MONTHS if name == "month" else _DAYS if name == "day of week" else {}
    for item in text.lower().split(","):
        part, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"cron expression {expression!r}: bad step {step_text!r} in the {name} field")
            step = int(step_text)
        if part == "*":
            first, last = low, high
        elif "-" in part:
            a, _, b = part.partition("-")
            first, last = _number(a, names, name, low, high, expression), _number(b, names, name, low, high, expression)
            if first > last:
                raise ValueError(f"cron expression {expression!r}: range {part!r} of the {name} field runs backwards")
        else:
            first = _number(part, names, name, low, high, expression)
            last = high if step_text else first
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _number(text: str, names: dict[str, int], name: str, low: int, high: int, expression: str) -> int:
    if text in names:
        return names[text]
    if not text.isdigit():
        raise ValueError(f"cron expression {expression!r}: {text!r} is not a value of the {name} field")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"cron expression {expression!r}: {value} is outside the {name} field ({low}-{high})")
    return value
