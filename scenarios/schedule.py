"""Treatment schedules: single doses, repeating drug courses and radiotherapy fractions.

A schedule expands into events `(time, agent, dose)`, the same triples a cohort stores: time in
years since the subject's baseline, dose in the agent's unit (mg, or Gy per radiotherapy
fraction). A day is 1 / 365.25 years and day 0 of a fraction plan is a Monday unless said
otherwise, as in the simulators' builders in `twin.data.treatment`, so a schedule written here
expands to exactly their events:

    Course:    t = start + c * every + j * DAY,     c < cycles,  j < days_per_cycle
    Fractions: t = start + n * DAY  for the first `fractions` days n >= 0 whose weekday
               (weekday + n) mod 7 is below per_week (0 = Monday: 5 per week = Mon-Fri)

Bad values raise `InputError` (a `ValueError`) naming the field and the value that came;
`twin.scenarios.files` maps those onto the field of the scenario file they came from.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from dataclasses import dataclass, replace

from twin.errors import InputError

DAY = 1.0 / 365.25  # years; equal to twin.data.treatment.DAY
RADIOTHERAPY = "radiotherapy"  # the agent of a fraction; dose in Gy
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

Event = tuple[float, str, float]  # (years since baseline, agent, dose)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too


def _check_time(owner: str, name: str, value) -> float:
    if not _is_real(value) or not math.isfinite(value):
        raise InputError(f"expected a finite time in years, got {value!r}", source=owner, field=name)
    return float(value)


def _check_dose(owner: str, name: str, value) -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise InputError(f"expected a finite dose >= 0, got {value!r}", source=owner, field=name)
    return float(value)


def _check_count(owner: str, name: str, value, low: int, high: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # ints and numpy ints; 6.0 is not a count
    except TypeError:
        raise InputError(f"expected an integer, got {value!r}", source=owner, field=name) from None
    if n < low or (high is not None and n > high):
        within = f">= {low}" if high is None else f"in {low}..{high}"
        raise InputError(f"expected an integer {within}, got {n}", source=owner, field=name)
    return n


def _check_agent(owner: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"expected a non-empty agent name, got {value!r}", source=owner, field="agent")
    return value


@dataclass(frozen=True)
class Dose:
    """One administration of `dose` of `agent` at `time` (years)."""

    time: float
    agent: str
    dose: float

    def __post_init__(self):
        object.__setattr__(self, "time", _check_time("Dose", "time", self.time))
        object.__setattr__(self, "agent", _check_agent("Dose", self.agent))
        object.__setattr__(self, "dose", _check_dose("Dose", "dose", self.dose))

    @property
    def start(self) -> float:
        return self.time

    def events(self) -> list[Event]:
        return [(self.time, self.agent, self.dose)]

    def shifted(self, dt: float) -> Dose:
        return replace(self, time=self.time + dt)


@dataclass(frozen=True)
class Course:
    """`cycles` cycles `every` years apart, each `days_per_cycle` daily doses of `dose`.

    "Every 21 days, 6 cycles": Course(agent, dose, start, 21 * DAY, 6). Temozolomide days 1-5
    of 28-day cycles: days_per_cycle=5, every=28 * DAY. A single block of daily doses (one
    cycle) needs no `every`. Cycles may not overlap: every >= days_per_cycle days.
    """

    agent: str
    dose: float
    start: float
    every: float | None
    cycles: int
    days_per_cycle: int = 1

    def __post_init__(self):
        object.__setattr__(self, "agent", _check_agent("Course", self.agent))
        object.__setattr__(self, "dose", _check_dose("Course", "dose", self.dose))
        object.__setattr__(self, "start", _check_time("Course", "start", self.start))
        object.__setattr__(self, "cycles", _check_count("Course", "cycles", self.cycles, 1))
        object.__setattr__(self, "days_per_cycle", _check_count("Course", "days_per_cycle", self.days_per_cycle, 1))
        if self.every is None:
            if self.cycles > 1:
                raise InputError(f"{self.cycles} cycles need `every` (the time between cycle starts)",
                                 source="Course", field="every")
            return
        every = _check_time("Course", "every", self.every)
        if every <= 0:
            raise InputError(f"expected a time > 0 between cycle starts, got {self.every!r}", source="Course", field="every")
        # a small tolerance: `every` is often written in weeks or months and converted to years
        if every < (self.days_per_cycle - 1e-9) * DAY:
            raise InputError(f"cycles of {self.days_per_cycle} daily doses would overlap when they start every "
                             f"{every / DAY:g} days", source="Course", field="every")
        object.__setattr__(self, "every", every)

    def events(self) -> list[Event]:
        every = 0.0 if self.every is None else self.every
        # the same expression as twin.data.treatment.course, so the floats agree exactly
        return [(self.start + c * every + j * DAY, self.agent, self.dose)
                for c in range(self.cycles) for j in range(self.days_per_cycle)]

    def shifted(self, dt: float) -> Course:
        return replace(self, start=self.start + dt)


@dataclass(frozen=True)
class Fractions:
    """Radiotherapy: `fractions` fractions of `dose_gy` Gy, one a day on `per_week` days a week.

    Treatment days are the first `per_week` weekdays (5: Monday to Friday; 7: every day).
    `weekday` is the weekday of `start` (0 = Monday). The first fraction is on `start` if that
    is a treatment day, else on the next one: a plan starting on a Saturday begins on Monday.
    """

    start: float
    dose_gy: float
    fractions: int
    per_week: int = 5
    weekday: int = 0

    agent = RADIOTHERAPY  # a class constant, not a field

    def __post_init__(self):
        object.__setattr__(self, "start", _check_time("Fractions", "start", self.start))
        object.__setattr__(self, "dose_gy", _check_dose("Fractions", "dose_gy", self.dose_gy))
        object.__setattr__(self, "fractions", _check_count("Fractions", "fractions", self.fractions, 1))
        object.__setattr__(self, "per_week", _check_count("Fractions", "per_week", self.per_week, 1, 7))
        object.__setattr__(self, "weekday", _check_count("Fractions", "weekday", self.weekday, 0, 6))

    def days(self) -> list[int]:
        """Days after `start` on which the fractions fall."""
        out, day = [], 0
        while len(out) < self.fractions:
            if (self.weekday + day) % 7 < self.per_week:
                out.append(day)
            day += 1
        return out

    def events(self) -> list[Event]:
        return [(self.start + day * DAY, RADIOTHERAPY, self.dose_gy) for day in self.days()]

    def shifted(self, dt: float) -> Fractions:
        """The same plan `dt` later; the weekday pattern moves with it (like shifting the events)."""
        return replace(self, start=self.start + dt)


Item = Dose | Course | Fractions
ITEMS = (Dose, Course, Fractions)


@dataclass(frozen=True)
class Schedule:
    """A named treatment schedule: doses, courses and fraction plans, in any order."""

    name: str
    items: tuple[Item, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"expected a non-empty name, got {self.name!r}", source="Schedule", field="name")
        items = tuple(self.items)
        for k, item in enumerate(items):
            if not isinstance(item, ITEMS):
                raise InputError(f"expected a Dose, Course or Fractions, got {type(item).__name__}",
                                 source="Schedule", field=f"items[{k}]")
        object.__setattr__(self, "items", items)

    @classmethod
    def none(cls, name: str = "untreated") -> Schedule:
        """No treatment at all."""
        return cls(name, ())

    def events(self) -> list[Event]:
        """All events sorted by time; same-time events keep the order of the items (stable)."""
        return sorted((e for item in self.items for e in item.events()), key=lambda e: e[0])

    def shifted(self, dt: float) -> Schedule:
        """Every item `dt` years later (earlier if negative)."""
        dt = _check_time("Schedule", "dt", dt)
        return replace(self, items=tuple(item.shifted(dt) for item in self.items))

    def agents(self) -> tuple[str, ...]:
        """The agents given, in order of first appearance among the items."""
        return tuple(dict.fromkeys(item.agent for item in self.items))


def factual_schedule(events: Iterable[tuple[float, str, float]], name: str = "factual") -> Schedule:
    """A subject's own events as a Schedule of Doses, so "own schedule" is one more arm.

    `events` are (time, agent, dose) triples; padding rows of a cohort's arrays (NaN time and
    empty agent) are skipped, so `zip(event_time, event_agent, event_dose)` can be passed as is.
    """
    items = []
    for t, agent, dose in events:
        if agent == "" and not math.isfinite(float(t)):
            continue
        items.append(Dose(float(t), str(agent), float(dose)))
    return Schedule(name, tuple(items))
