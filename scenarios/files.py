"""Scenario files: named arms of treatment schedules, read strictly from YAML or TOML.

A scenario file lists arms, each a schedule to replay a patient under. Its format
(`twin-scenarios/1`), in YAML (TOML spells the same tables, see `examples/glioma.toml`):

    name: delay-or-stop                 # optional; default: the file's stem
    description: ...                    # optional
    anchor: last_visit                  # optional default of every arm: last_visit | baseline
    keep_history: true                  # optional default of every arm
    arms:                               # required, at least one; arm names: letters, digits, _ -
      continue:
        description: ...                # optional
        anchor: baseline                # optional, overrides the file's
        keep_history: false             # optional, overrides the file's
        items:                          # required, may be empty (= no treatment from the anchor)
          - {kind: dose,      agent: dmt, dose: 10, start: 2 weeks}
          - {kind: course,    agent: temozolomide, dose: 300, start: 0, every: 28 days,
             cycles: 6, days_per_cycle: 5}          # every: only needed when cycles > 1
          - {kind: fractions, start: 1 week, dose_gy: 2, fractions: 30,
             per_week: 5, weekday: monday}          # per_week 5 and weekday monday by default

Rules (each broken one is an `InputError` naming the file and the dotted field, such as
`arms.continue.items[1].every`):
- Unknown keys are errors at every level (the message lists the allowed ones); so are missing
  required keys, values of the wrong type, and impossible values (negative doses, zero cycles,
  non-integer counts, cycles that overlap).
- Durations (`start`, `every`) are strings with a unit: "21 days", "3 weeks", "6 months",
  "1.5 years" (d, w, y and singular forms too); a month is 1/12 year, a day 1/365.25 year. A
  bare number is refused, because "21" could mean days or years, except 0.
- `start` is the time after the arm's anchor, >= 0: `baseline` (time 0, the subject's first
  visit) or `last_visit` (the subject's last observed visit, the default, since a scenario
  usually asks "what happens from now on"). With `keep_history` (default true) the subject's
  own events strictly before the anchor are kept and the arm replaces everything after; without
  it the arm is the whole treatment.
- Arm `factual` is reserved for the subject's own schedule (`factual_schedule`). YAML files may
  not repeat a key (PyYAML would silently keep the last), as TOML already forbids.

`ScenarioSet.to_dict()` gives the same format, JSON-serialisable, so a result can record the
scenario it ran; `ScenarioSet.from_dict` reads it back to an equal set.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from twin.errors import InputError

from .schedule import DAY, WEEKDAYS, Course, Dose, Event, Fractions, Item, Schedule, _check_time, factual_schedule

FORMAT = "twin-scenarios/1"
ANCHORS = ("last_visit", "baseline")
FACTUAL = "factual"  # the subject's own schedule, added by whoever compares arms with it
_ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Arm:
    """One arm: items whose start times are relative to the anchor (years, >= 0)."""

    name: str
    items: tuple[Item, ...] = ()
    anchor: str = "last_visit"
    keep_history: bool = True
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _ARM_NAME.match(self.name):
            raise InputError(f"arm names are letters, digits, '_' and '-'; got {self.name!r}", source="Arm", field="name")
        if self.name == FACTUAL:
            raise InputError(f"arm name {FACTUAL!r} is reserved for the subject's own schedule", source="Arm", field="name")
        if self.anchor not in ANCHORS:
            raise InputError(f"expected one of {', '.join(ANCHORS)}, got {self.anchor!r}", source="Arm", field="anchor")
        if not isinstance(self.keep_history, bool):
            raise InputError(f"expected true or false, got {self.keep_history!r}", source="Arm", field="keep_history")
        if not isinstance(self.description, str):
            raise InputError(f"expected a string, got {self.description!r}", source="Arm", field="description")
        items = Schedule(self.name, self.items).items  # checks the item types
        for k, item in enumerate(items):
            if item.start < 0:
                raise InputError(f"start is the time after the anchor and must be >= 0, got {item.start!r} years",
                                 source="Arm", field=f"items[{k}].start")
        object.__setattr__(self, "items", items)

    @property
    def schedule(self) -> Schedule:
        """The arm's schedule with times relative to its anchor."""
        return Schedule(self.name, self.items)

    def resolve(self, last_visit: float, history: Iterable[Event] = ()) -> Schedule:
        """The arm for one subject, in years since their baseline.

        last_visit: time of the subject's last observed visit. history: the subject's own
        events (cohort padding allowed); those strictly before the anchor are kept if
        `keep_history`.
        """
        last_visit = _check_time(f"arm {self.name}", "last_visit", last_visit)
        at = 0.0 if self.anchor == "baseline" else last_visit
        past = factual_schedule(history).items if self.keep_history else ()
        kept = tuple(d for d in past if d.time < at)
        return Schedule(self.name, kept + self.schedule.shifted(at).items)


@dataclass(frozen=True)
class ScenarioSet:
    """The arms of a scenario file, in file order."""

    name: str
    arms: tuple[Arm, ...]
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"expected a non-empty name, got {self.name!r}", source="ScenarioSet", field="name")
        if not isinstance(self.description, str):
            raise InputError(f"expected a string, got {self.description!r}", source="ScenarioSet", field="description")
        arms = tuple(self.arms)
        if not arms:
            raise InputError("a scenario set needs at least one arm", source="ScenarioSet", field="arms")
        names = [a.name for a in arms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"arm names must be unique, repeated: {', '.join(twice)}", source="ScenarioSet", field="arms")
        object.__setattr__(self, "arms", arms)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arms)

    def __getitem__(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"no arm {name!r}; arms: {', '.join(self.names)}")

    def events_for(self, last_visit: float, history: Iterable[Event] = ()) -> dict[str, list[Event]]:
        """Each arm's events for one subject: {arm name: [(time since baseline, agent, dose), ...]}."""
        history = list(history)
        return {arm.name: arm.resolve(last_visit, history).events() for arm in self.arms}

    def to_dict(self) -> dict:
        """The scenario-file form (JSON-serialisable); every arm's anchor and history rule spelled out."""
        arms = {}
        for arm in self.arms:
            entry = {"anchor": arm.anchor, "keep_history": arm.keep_history}
            if arm.description:
                entry["description"] = arm.description
            entry["items"] = [_item_to_dict(item) for item in arm.items]
            arms[arm.name] = entry
        out = {"format": FORMAT, "name": self.name}
        if self.description:
            out["description"] = self.description
        out["arms"] = arms
        return out

    @classmethod
    def from_dict(cls, data, *, source: str = "scenarios", name: str | None = None) -> ScenarioSet:
        """Read the scenario-file form, strictly; `source` names the origin in errors, `name` is the
        default set name."""
        return _Reader(str(source)).scenario_set(data, name)


def load_scenarios(path: str | Path) -> ScenarioSet:
    """Read a scenario file (.yaml, .yml or .toml); any problem is an InputError naming the file."""
    path = Path(path)
    return ScenarioSet.from_dict(_read(path), source=str(path), name=path.stem)


# ---- reading ---------------------------------------------------------------------------------

_TOP = ({"arms"}, {"format", "name", "description", "anchor", "keep_history"})
_ARM = ({"items"}, {"description", "anchor", "keep_history"})
_ITEMS = {  # kind: (required, optional) keys
    "dose": ({"kind", "agent", "dose", "start"}, set()),
    "course": ({"kind", "agent", "dose", "start", "cycles"}, {"every", "days_per_cycle"}),
    "fractions": ({"kind", "start", "dose_gy", "fractions"}, {"per_week", "weekday"}),
}
# Keys as the dataclasses call them -> as files call them, to name the file's field in errors.
_FILE_KEY = {"time": "start"}

_DURATION = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]+)\s*$")
_UNITS = {  # unit -> (years per unit as a function of the count): days and weeks go through days
    **dict.fromkeys(("d", "day", "days"), lambda n: n * DAY),
    **dict.fromkeys(("w", "week", "weeks"), lambda n: (n * 7) * DAY),
    **dict.fromkeys(("month", "months"), lambda n: n / 12),
    **dict.fromkeys(("y", "year", "years"), lambda n: n),
}


def _read(path: Path):
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise InputError(f"expected a .yaml, .yml or .toml scenario file, got {path.name!r}", source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("no such scenario file", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the scenario file: {e}", source=str(path)) from None
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"not valid TOML: {e}", source=str(path)) from None
    import yaml

    try:
        return yaml.load(text, Loader=_strict_yaml_loader())
    except yaml.YAMLError as e:
        raise InputError("not valid YAML: " + " ".join(str(e).split()), source=str(path)) from None


@functools.cache
def _strict_yaml_loader():
    """A yaml.SafeLoader that refuses a key repeated in one mapping (SafeLoader keeps the last)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: construct_mapping reports it
                break
            if repeated:
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


class _Reader:
    """Checks one scenario document; every error names `source` and the dotted field."""

    def __init__(self, source: str):
        self.source = source

    def error(self, field: str | None, message: str) -> InputError:
        return InputError(message, source=self.source, field=field or None)

    # -- structure

    def table(self, value, field: str, keys: tuple[set, set], what: str) -> dict:
        required, optional = keys
        if not isinstance(value, Mapping):
            raise self.error(field, f"expected a table of {what}, got {_kind(value)}")
        allowed = sorted(required | optional)
        for key in value:
            if key not in allowed:
                near = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise self.error(_join(field, key), f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
        missing = [k for k in sorted(required) if k not in value]
        if missing:
            raise self.error(_join(field, missing[0]), f"missing required key {missing[0]!r} in {what}")
        return dict(value)

    def scenario_set(self, data, default_name: str | None) -> ScenarioSet:
        if data is None:
            raise self.error(None, "the scenario file is empty; expected a table with 'arms'")
        top = self.table(data, "", _TOP, "a scenario set")
        if "format" in top and top["format"] != FORMAT:
            raise self.error("format", f"expected {FORMAT!r}, got {top['format']!r}")
        name = self.text(top["name"], "name", nonempty=True) if "name" in top else (default_name or "scenarios")
        description = self.text(top.get("description", ""), "description")
        anchor = self.choice(top.get("anchor", "last_visit"), "anchor", ANCHORS)
        keep = self.boolean(top.get("keep_history", True), "keep_history")
        arms_in = top["arms"]
        if not isinstance(arms_in, Mapping):
            raise self.error("arms", f"expected a table of arms (arm name -> arm), got {_kind(arms_in)}")
        if not arms_in:
            raise self.error("arms", "expected at least one arm, got none")
        arms = tuple(self.arm(key, value, anchor, keep) for key, value in arms_in.items())
        return ScenarioSet(name, arms, description)

    def arm(self, key, value, anchor: str, keep: bool) -> Arm:
        if not isinstance(key, str) or not _ARM_NAME.match(key):
            raise self.error("arms", f"arm names are letters, digits, '_' and '-'; got {key!r}")
        if key == FACTUAL:
            raise self.error(f"arms.{key}", f"arm name {FACTUAL!r} is reserved for the subject's own schedule")
        field = f"arms.{key}"
        arm = self.table(value, field, _ARM, f"arm {key!r}")
        items = arm["items"]
        if not isinstance(items, list):
            raise self.error(f"{field}.items", f"expected a list of items (may be empty), got {_kind(items)}")
        return Arm(
            name=key,
            items=tuple(self.item(entry, f"{field}.items[{k}]") for k, entry in enumerate(items)),
            anchor=self.choice(arm.get("anchor", anchor), f"{field}.anchor", ANCHORS),
            keep_history=self.boolean(arm.get("keep_history", keep), f"{field}.keep_history"),
            description=self.text(arm.get("description", ""), f"{field}.description"),
        )

    def item(self, value, field: str) -> Item:
        if not isinstance(value, Mapping):
            raise self.error(field, f"expected a table with kind = {' | '.join(_ITEMS)}, got {_kind(value)}")
        if "kind" not in value:
            raise self.error(f"{field}.kind", f"missing required key 'kind'; expected one of {', '.join(_ITEMS)}")
        kind = self.choice(value["kind"], f"{field}.kind", tuple(_ITEMS))
        v = self.table(value, field, _ITEMS[kind], f"a {kind} item")
        start = self.duration(v["start"], f"{field}.start")
        if kind == "dose":
            return self.build(Dose, field, time=start, agent=self.text(v["agent"], f"{field}.agent", nonempty=True),
                              dose=self.number(v["dose"], f"{field}.dose"))
        if kind == "course":
            every = self.duration(v["every"], f"{field}.every") if "every" in v else None
            return self.build(Course, field, agent=self.text(v["agent"], f"{field}.agent", nonempty=True),
                              dose=self.number(v["dose"], f"{field}.dose"), start=start, every=every,
                              cycles=self.integer(v["cycles"], f"{field}.cycles"),
                              days_per_cycle=self.integer(v.get("days_per_cycle", 1), f"{field}.days_per_cycle"))
        weekday = self.choice(v.get("weekday", "monday"), f"{field}.weekday", WEEKDAYS)
        return self.build(Fractions, field, start=start, dose_gy=self.number(v["dose_gy"], f"{field}.dose_gy"),
                          fractions=self.integer(v["fractions"], f"{field}.fractions"),
                          per_week=self.integer(v.get("per_week", 5), f"{field}.per_week"),
                          weekday=WEEKDAYS.index(weekday))

    def build(self, cls, field: str, **kwargs):
        """Construct an item; its own range checks become errors on the file's field."""
        try:
            return cls(**kwargs)
        except InputError as e:
            raise self.error(_join(field, _FILE_KEY.get(e.field, e.field)), e.message) from None

    # -- values

    def duration(self, value, field: str) -> float:
        """Years from "21 days" / "3 weeks" / "6 months" / "1.5 years" (or the number 0)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            return 0.0
        if not isinstance(value, str):
            raise self.error(field, f"expected a duration with a unit such as '21 days', '3 weeks', '6 months' or "
                                    f"'1.5 years', got {_show(value)}")
        match = _DURATION.match(value)
        unit = match and _UNITS.get(match.group(2).lower())
        if not unit:
            raise self.error(field, f"expected '<number> <unit>' with unit days, weeks, months or years, got {value!r}")
        count = float(match.group(1))
        years = unit(count)
        if not (math.isfinite(years) and years >= 0):
            raise self.error(field, f"expected a finite duration >= 0, got {value!r}")
        return float(years)

    def number(self, value, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, f"expected a number, got {_show(value)}")
        return float(value)

    def integer(self, value, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(field, f"expected a whole number, got {_show(value)}")
        return value

    def boolean(self, value, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(field, f"expected true or false, got {_show(value)}")
        return value

    def text(self, value, field: str, nonempty: bool = False) -> str:
        if not isinstance(value, str) or (nonempty and not value.strip()):
            raise self.error(field, f"expected {'a non-empty' if nonempty else 'a'} string, got {_show(value)}")
        return value

    def choice(self, value, field: str, options: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise self.error(field, f"expected one of {', '.join(options)}, got {_show(value)}")
        return value.lower()


def _join(field: str, key) -> str:
    return f"{field}.{key}" if field else str(key)


def _kind(value) -> str:
    names = {dict: "a table", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}
    return names.get(type(value), f"a {type(value).__name__}")


def _show(value) -> str:
    return "nothing" if value is None else repr(value)


# ---- writing ---------------------------------------------------------------------------------

def _item_to_dict(item: Item) -> dict:
    if isinstance(item, Dose):
        return {"kind": "dose", "agent": item.agent, "dose": item.dose, "start": _duration_text(item.time)}
    if isinstance(item, Course):
        out = {"kind": "course", "agent": item.agent, "dose": item.dose, "start": _duration_text(item.start)}
        if item.every is not None:
            out["every"] = _duration_text(item.every)
        out.update(cycles=item.cycles, days_per_cycle=item.days_per_cycle)
        return out
    return {"kind": "fractions", "start": _duration_text(item.start), "dose_gy": item.dose_gy,
            "fractions": item.fractions, "per_week": item.per_week, "weekday": WEEKDAYS[item.weekday]}


def _duration_text(years: float) -> str:
    """Years as whole years, days or months where one reads back to exactly `years`, else in years."""
    if years == 0:
        return "0 days"
    if float(years).is_integer():
        return _plural(int(years), "year")
    days = round(years / DAY)
    if days * DAY == years:
        return _plural(days, "day")
    months = round(years * 12)
    if months / 12 == years:
        return _plural(months, "month")
    return f"{years!r} years"  # repr reads back to the same float


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"
