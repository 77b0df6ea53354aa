"""Treatment schedules, scenario files and control signals against exact expansions and closed forms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from twin.data import treatment as tx
from twin.data.schema import events_array
from twin.dynamics.ode import Solver, solve
from twin.errors import InputError
from twin.scenarios import (DAY, Arm, Course, Dose, Fractions, ScenarioSet, Schedule, controls_from_events,
                            factual_schedule, load_scenarios)

EXAMPLES = Path(__file__).resolve().parents[1] / "scenarios" / "examples"
TMZ, RT = tx.TEMOZOLOMIDE, tx.RADIOTHERAPY


def days_of(events, start=0.0):
    return [round((t - start) / DAY, 9) for t, _, _ in events]


# ---- schedules ------------------------------------------------------------------------------

def test_day_is_the_simulators_day():
    assert DAY == tx.DAY


def test_course_every_21_days_6_cycles():
    events = Course("carboplatin", 400.0, 0.0, 21 * DAY, 6).events()
    assert days_of(events) == [0, 21, 42, 63, 84, 105]
    assert {(a, d) for _, a, d in events} == {("carboplatin", 400.0)}


def test_temozolomide_5_of_28_days_6_cycles_matches_the_simulator():
    start = 0.3
    events = Course(TMZ, 300.0, start, 28 * DAY, 6, days_per_cycle=5).events()
    assert len(events) == 30
    assert days_of(events, start)[:7] == [0, 1, 2, 3, 4, 28, 29]
    assert events == tx.course(start, 28 * DAY, 6, 300.0, TMZ)  # bit for bit


def test_thirty_fractions_from_a_monday_end_on_day_39():
    events = Fractions(0.1, 2.0, 30).events()
    days = days_of(events, 0.1)
    assert len(days) == 30 and days[-1] == 39
    assert not any(d % 7 in (5, 6) for d in days)  # no weekends
    assert events == tx.radiotherapy(0.1, 30, 2.0)


def test_fractions_from_a_wednesday_skip_the_first_weekend():
    days = Fractions(0.0, 2.0, 30, weekday=2).days()
    assert days[:4] == [0, 1, 2, 5] and days[-1] == 41
    # the same calendar as a Monday plan that started two days earlier
    monday = [d - 2 for d in Fractions(0.0, 2.0, 32).days()[2:]]
    assert days == monday


@pytest.mark.parametrize("weekday, first", [(5, 2), (6, 1), (4, 0)])
def test_fractions_starting_on_a_non_treatment_day_begin_on_monday(weekday, first):
    assert Fractions(0.0, 2.0, 3, weekday=weekday).days()[0] == first


def test_fractions_per_week():
    assert Fractions(0.0, 2.0, 10, per_week=7).days() == list(range(10))
    assert Fractions(0.0, 2.0, 7, per_week=6).days() == [0, 1, 2, 3, 4, 5, 7]


def stupp_schedule(start: float, chemo: bool = True) -> Schedule:
    items = [Fractions(start, 2.0, 30)]
    if chemo:
        items += [Course(TMZ, 135.0, start, None, 1, days_per_cycle=40),
                  Course(TMZ, 300.0, start + (40 + 28) * DAY, 28 * DAY, 6, days_per_cycle=5)]
    return Schedule("stupp", tuple(items))


@pytest.mark.parametrize("chemo", [True, False])
def test_stupp_equals_the_simulators_builder(chemo):
    start = 33 * DAY
    assert stupp_schedule(start, chemo).events() == tx.stupp(start, chemo=chemo)


def assert_events_close(got, want):
    assert len(got) == len(want)
    assert [(a, d) for _, a, d in got] == [(a, d) for _, a, d in want]
    np.testing.assert_allclose([t for t, _, _ in got], [t for t, _, _ in want], rtol=0, atol=1e-12)


def test_shifted_moves_every_event_and_none_is_empty():
    s = stupp_schedule(0.1)
    assert_events_close(s.shifted(0.25).events(), [(t + 0.25, a, d) for t, a, d in s.events()])
    assert_events_close(s.shifted(0.25).events(), tx.stupp(0.35))  # the simulator's "delayed"
    assert Schedule.none().events() == [] and Schedule.none().name == "untreated"
    assert s.agents() == (RT, TMZ)


def test_events_sorted_stably():
    s = Schedule("x", (Dose(0.5, "b", 1.0), Dose(0.1, "a", 2.0), Dose(0.5, "a", 3.0)))
    assert s.events() == [(0.1, "a", 2.0), (0.5, "b", 1.0), (0.5, "a", 3.0)]


@pytest.mark.parametrize("make, field, value", [
    (lambda: Dose(0.0, "dmt", -1.0), "dose", "-1.0"),
    (lambda: Dose(math.nan, "dmt", 1.0), "time", "nan"),
    (lambda: Dose(0.0, "", 1.0), "agent", "''"),
    (lambda: Course("a", 1.0, 0.0, DAY, 0), "cycles", "0"),
    (lambda: Course("a", 1.0, 0.0, DAY, 2.0), "cycles", "2.0"),
    (lambda: Course("a", 1.0, 0.0, 0.0, 2), "every", "0.0"),
    (lambda: Course("a", 1.0, 0.0, None, 2), "every", "2 cycles"),
    (lambda: Course("a", 1.0, 0.0, 3 * DAY, 2, days_per_cycle=5), "every", "overlap"),
    (lambda: Course("a", 1.0, math.inf, DAY, 2), "start", "inf"),
    (lambda: Fractions(0.0, 2.0, 0), "fractions", "0"),
    (lambda: Fractions(0.0, 2.0, 30, per_week=8), "per_week", "8"),
    (lambda: Fractions(0.0, 2.0, 30, per_week=0), "per_week", "0"),
    (lambda: Fractions(0.0, -2.0, 30), "dose_gy", "-2.0"),
    (lambda: Schedule("", ()), "name", "''"),
])
def test_impossible_values_name_the_field_and_the_value(make, field, value):
    with pytest.raises(ValueError) as info:
        make()
    assert f": {field}: " in str(info.value) and value in str(info.value)


def test_factual_schedule_wraps_a_cohorts_padded_events():
    own = [(0.5, "dmt", 10.0), (0.2, "dmt", 10.0), (0.7, "x", 1.0)]
    time, agent, dose = events_array([own, [(0.1, "dmt", 5.0)] * 5])  # padded to 5 events
    s = factual_schedule(zip(time[0], agent[0], dose[0]))
    assert s.name == "factual" and s.events() == sorted(own)


# ---- scenario files -------------------------------------------------------------------------

SAME_YAML = """
name: pair
description: the same set written twice
anchor: baseline
arms:
  weekly:
    keep_history: false
    items:
      - {kind: course, agent: dmt, dose: 10, start: 0, every: 1 week, cycles: 4}
      - {kind: dose, agent: dmt, dose: 2.5, start: 1.5 years}
  rt:
    anchor: last_visit
    description: radiotherapy from a Wednesday
    items:
      - {kind: fractions, start: 2 w, dose_gy: 1.8, fractions: 28, per_week: 5, weekday: Wednesday}
      - {kind: course, agent: temozolomide, dose: 75, start: 14d, cycles: 1, days_per_cycle: 42}
  nothing:
    items: []
"""

SAME_TOML = """
name = "pair"
description = "the same set written twice"
anchor = "baseline"

[arms.weekly]
keep_history = false
items = [
  {kind = "course", agent = "dmt", dose = 10.0, start = "0 days", every = "7 days", cycles = 4},
  {kind = "dose", agent = "dmt", dose = 2.5, start = "18 months"},
]

[arms.rt]
anchor = "last_visit"
description = "radiotherapy from a Wednesday"
[[arms.rt.items]]
kind = "fractions"
start = "14 days"
dose_gy = 1.8
fractions = 28
weekday = "wednesday"
[[arms.rt.items]]
kind = "course"
agent = "temozolomide"
dose = 75
start = "2 weeks"
cycles = 1
days_per_cycle = 42

[arms.nothing]
items = []
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_toml_read_to_the_same_set(tmp_path):
    a = load_scenarios(write(tmp_path, "a.yaml", SAME_YAML))
    b = load_scenarios(write(tmp_path, "b.toml", SAME_TOML))
    assert a == b
    assert a.names == ("weekly", "rt", "nothing")
    assert a["weekly"].anchor == "baseline" and a["weekly"].keep_history is False
    assert a["rt"].anchor == "last_visit" and a["rt"].keep_history is True
    assert a["rt"].items[0] == Fractions(14 * DAY, 1.8, 28, weekday=2)
    assert a["weekly"].items[1] == Dose(1.5, "dmt", 2.5)
    with pytest.raises(KeyError, match="weekly, rt, nothing"):
        a["monthly"]


def test_name_defaults_to_the_file_stem(tmp_path):
    s = load_scenarios(write(tmp_path, "my-plan.yml", "arms: {a: {items: []}}"))
    assert s.name == "my-plan" and s["a"].anchor == "last_visit" and s["a"].keep_history is True


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.*")), ids=lambda p: p.name)
def test_round_trip_through_json(path):
    s = load_scenarios(path)
    again = ScenarioSet.from_dict(json.loads(json.dumps(s.to_dict())), source="result.attrs")
    assert again == s


def test_round_trip_keeps_awkward_times_exactly():
    s = ScenarioSet("odd", (Arm("a", (Dose(0.123456789, "x", 1.0), Dose(1 / 12, "x", 1.0), Dose(3.0, "x", 0.0),
                                      Course("x", 2.0, 17 * DAY, 0.3, 3, 2), Fractions(DAY, 2.0, 5, 6, 3)),
                                anchor="baseline", keep_history=False, description="d"),))
    d = s.to_dict()
    assert [i["start"] for i in d["arms"]["a"]["items"]] == ["0.123456789 years", "1 month", "3 years", "17 days",
                                                               "1 day"]
    assert ScenarioSet.from_dict(d) == s


def test_glioma_example_is_the_simulators_stupp():
    s = load_scenarios(EXAMPLES / "glioma.toml")
    ev = s.events_for(last_visit=2.0, history=[(0.1, RT, 2.0)])  # anchor baseline, history dropped
    assert_events_close(ev["standard"], tx.stupp(28 * DAY))
    assert_events_close(ev["radiotherapy_alone"], tx.stupp(28 * DAY, chemo=False))
    assert_events_close(ev["delayed"], tx.stupp(28 * DAY + 13 * 7 * DAY))
    assert ev["untreated"] == [] and len(ev["short_course"]) == 15


def test_atrophy_example_anchors_at_the_last_visit_and_keeps_the_past():
    s = load_scenarios(EXAMPLES / "atrophy.yaml")
    own = [(0.2, "dmt", 10.0), (0.9, "dmt", 10.0), (1.3, "dmt", 10.0)]  # the last one after the visit
    ev = s.events_for(last_visit=1.0, history=own)
    past = [(0.2, "dmt", 10.0), (0.9, "dmt", 10.0)]
    assert ev["stop"] == past and ev["never"] == []
    assert ev["start_now"][:2] == past and len(ev["start_now"]) == 2 + 26
    assert_events_close(ev["start_now"][2:], [(1.0 + k * 28 * DAY, "dmt", 10.0) for k in range(26)])
    assert ev["delayed"][2][0] == pytest.approx(2.0) and ev["double_dose"][2] == (1.0, "dmt", 20.0)


def test_arm_anchor_at_an_event_time_drops_that_event():
    arm = Arm("a", (Dose(0.0, "x", 5.0),))
    assert arm.resolve(1.0, [(0.5, "x", 1.0), (1.0, "x", 1.0)]).events() == [(0.5, "x", 1.0), (1.0, "x", 5.0)]


MINIMAL = "arms:\n  a:\n    items:\n      - {kind: course, agent: dmt, dose: 10, start: 0, every: 28 days, cycles: 6}\n"


def item(**change):
    """A one-item YAML file; a change to None removes the key."""
    fields = {"kind": "course", "agent": "dmt", "dose": 10, "start": 0, "every": "28 days", "cycles": 6}
    fields.update(change)
    fields = {k: v for k, v in fields.items() if v is not None}
    return "arms:\n  a:\n    items:\n      - " + json.dumps(fields) + "\n"


BAD_YAML = [
    ("unknown top-level key", "arm: {}\n" + MINIMAL, "arm", "unknown key 'arm'"),
    ("unknown arm key", "arms:\n  a: {items: [], descripton: x}\n", "arms.a.descripton", "did you mean 'description'"),
    ("unknown item key", "arms:\n  delayed:\n    items:\n      - {kind: dose, agent: x, dose: 1, start: 0}\n"
                         "      - {kind: course, agent: x, dose: 1, start: 0, cycles: 2, evry: 3 days}\n",
     "arms.delayed.items[1].evry", "did you mean 'every'"),
    ("negative dose", item(dose=-10), "arms.a.items[0].dose", "got -10.0"),
    ("zero cycles", item(cycles=0), "arms.a.items[0].cycles", "got 0"),
    ("fractional cycles", item(cycles=6.5), "arms.a.items[0].cycles", "whole number"),
    ("fractions not integer", "arms:\n  a:\n    items:\n      - {kind: fractions, start: 0, dose_gy: 2, fractions: 30.0}\n",
     "arms.a.items[0].fractions", "whole number, got 30.0"),
    ("per_week out of range", "arms:\n  a:\n    items:\n      - {kind: fractions, start: 0, dose_gy: 2, fractions: 3, per_week: 9}\n",
     "arms.a.items[0].per_week", "in 1..7, got 9"),
    ("bad unit", item(every="4 fortnights"), "arms.a.items[0].every", "unit days, weeks, months or years"),
    ("bare number", item(every=28), "arms.a.items[0].every", "with a unit"),
    ("negative start", item(start="-3 days"), "arms.a.items[0].start", ">= 0"),
    ("zero every", item(every="0 days"), "arms.a.items[0].every", "> 0"),
    ("overlapping cycles", item(every="2 days", days_per_cycle=5), "arms.a.items[0].every", "overlap"),
    ("missing every", item(every=None), "arms.a.items[0].every", "6 cycles need"),
    ("missing agent", item(agent=None), "arms.a.items[0].agent", "missing required key 'agent'"),
    ("missing kind", item(kind=None), "arms.a.items[0].kind", "missing required key 'kind'"),
    ("unknown kind", item(kind="infusion"), "arms.a.items[0].kind", "dose, course, fractions"),
    ("dose as text", item(dose="10 mg"), "arms.a.items[0].dose", "expected a number, got '10 mg'"),
    ("boolean count", item(cycles=True), "arms.a.items[0].cycles", "whole number"),
    ("bad weekday", "arms:\n  a:\n    items:\n      - {kind: fractions, start: 0, dose_gy: 2, fractions: 3, weekday: fri}\n",
     "arms.a.items[0].weekday", "monday"),
    ("agent on fractions", "arms:\n  a:\n    items:\n      - {kind: fractions, agent: rt, start: 0, dose_gy: 2, fractions: 3}\n",
     "arms.a.items[0].agent", "unknown key 'agent'"),
    ("items not a list", "arms:\n  a: {items: {kind: dose}}\n", "arms.a.items", "list of items"),
    ("item not a table", "arms:\n  a: {items: [3]}\n", "arms.a.items[0]", "got a int"),
    ("missing items", "arms:\n  a: {description: x}\n", "arms.a.items", "missing required key 'items'"),
    ("arms as a list", "arms: [a, b]\n", "arms", "table of arms"),
    ("empty arms", "arms: {}\n", "arms", "at least one arm"),
    ("missing arms", "name: x\n", "arms", "missing required key 'arms'"),
    ("bad anchor", "anchor: first_visit\n" + MINIMAL, "anchor", "last_visit, baseline"),
    ("bad arm anchor", "arms:\n  a: {items: [], anchor: now}\n", "arms.a.anchor", "got 'now'"),
    ("keep_history not boolean", "keep_history: 1\n" + MINIMAL, "keep_history", "true or false"),
    ("reserved arm name", "arms:\n  factual: {items: []}\n", "arms.factual", "reserved"),
    ("arm name with a dot", "arms:\n  a.b: {items: []}\n", "arms", "'a.b'"),
    ("wrong format", "format: twin-scenarios/2\n" + MINIMAL, "format", "twin-scenarios/1"),
]


@pytest.mark.parametrize("text, field, message", [b[1:] for b in BAD_YAML], ids=[b[0] for b in BAD_YAML])
def test_bad_yaml_names_the_file_and_the_field(tmp_path, text, field, message):
    path = write(tmp_path, "plan.yaml", text)
    with pytest.raises(InputError) as info:
        load_scenarios(path)
    assert info.value.source == str(path) and info.value.field == field
    assert str(info.value).startswith(f"{path}: {field}: ") and message in str(info.value)


BAD_TOML = [
    ("unknown item key", '[[arms.delayed.items]]\nkind = "dose"\nagent = "x"\ndose = 1\nstart = "0d"\n'
                         '[[arms.delayed.items]]\nkind = "course"\nagent = "x"\ndose = 1\nstart = 0\ncycles = 2\nevry = "3 days"\n',
     "arms.delayed.items[1].evry", "allowed: agent, cycles, days_per_cycle, dose, every, kind, start"),
    ("negative dose", '[[arms.a.items]]\nkind = "dose"\nagent = "x"\ndose = -1\nstart = "1 week"\n',
     "arms.a.items[0].dose", ">= 0"),
    ("nan dose", '[[arms.a.items]]\nkind = "dose"\nagent = "x"\ndose = nan\nstart = "1 week"\n',
     "arms.a.items[0].dose", "got nan"),
    ("unknown top-level key", 'anchr = "baseline"\n[arms.a]\nitems = []\n', "anchr", "did you mean 'anchor'"),
]


@pytest.mark.parametrize("text, field, message", [b[1:] for b in BAD_TOML], ids=[b[0] for b in BAD_TOML])
def test_bad_toml_names_the_file_and_the_field(tmp_path, text, field, message):
    path = write(tmp_path, "plan.toml", text)
    with pytest.raises(InputError) as info:
        load_scenarios(path)
    assert str(info.value).startswith(f"{path}: {field}: ") and message in str(info.value)


@pytest.mark.parametrize("name, text, message", [
    ("plan.yaml", "arms: {a: {items: []}\n", "not valid YAML"),
    ("plan.yaml", "arms:\n  a: {items: []}\n  a: {items: []}\n", "found the key 'a' twice"),
    ("plan.yaml", "", "empty"),
    ("plan.yaml", "- 1\n- 2\n", "expected a table of a scenario set, got a list"),
    ("plan.toml", "[arms.a]\nitems = [\n", "not valid TOML"),
    ("plan.toml", "[arms.a]\nitems = []\n[arms.a]\nitems = []\n", "not valid TOML"),
    ("plan.json", "{}", "expected a .yaml, .yml or .toml"),
])
def test_unreadable_files_name_the_file(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(InputError) as info:
        load_scenarios(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such scenario file"):
        load_scenarios(tmp_path / "nope.yaml")


def test_arms_in_python_are_checked_too():
    with pytest.raises(InputError, match="items\\[0\\].start: .*>= 0"):
        Arm("a", (Dose(-0.1, "x", 1.0),))
    with pytest.raises(InputError, match="unique, repeated: a"):
        ScenarioSet("s", (Arm("a"), Arm("a")))
    with pytest.raises(InputError, match="at least one arm"):
        ScenarioSet("s", ())


# ---- control signals ------------------------------------------------------------------------

K = torch.tensor([40.0, 9.0], dtype=torch.float64)  # 1/year: temozolomide, dmt
AGENTS = (TMZ, "dmt", RT)

PATIENTS = [  # three schedules of different lengths; unsorted on purpose
    [(0.30, TMZ, 100.0), (0.10, TMZ, 150.0), (0.20, "dmt", 10.0), (0.15, RT, 2.0), (0.16, RT, 2.0)],
    [(0.05, "dmt", 10.0)],
    [(-0.1, TMZ, 50.0), (0.25, TMZ, 80.0), (0.4, RT, 1.8)],
]


def controls(events, **kw):
    return controls_from_events(events, AGENTS, dtype=torch.float64, **kw)


def reference_u(events, t):
    """numpy one-compartment concentrations (twin.data.treatment), (T, n_drugs)."""
    cols = []
    for agent, k in zip((TMZ, "dmt"), K.tolist()):
        times, amounts = tx.doses(events, agent)
        cols.append(tx.concentration(t, times, amounts, tx.OneCompartment(k, 1.0)))
    return np.stack(cols, -1)


def test_layout_sorted_per_agent_and_nan_padded():
    c = controls(PATIENTS)
    assert c.batch == 3 and c.drugs == (TMZ, "dmt") and c.fractions == (RT,)
    time, dose = c.of(TMZ)
    assert time.shape == (3, 2)
    torch.testing.assert_close(time, torch.tensor([[0.10, 0.30], [math.nan, math.nan], [-0.1, 0.25]],
                                                  dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(dose[0], torch.tensor([150.0, 100.0], dtype=torch.float64))


def test_u_batched_equals_per_patient_and_the_numpy_reference():
    c = controls(PATIENTS)
    t = torch.tensor([[0.0, 0.1, 0.12, 0.3, 0.5]] * 3, dtype=torch.float64)
    batched = c.u(t, K)  # (B, T, n_drugs)
    assert batched.shape == (3, 5, 2)
    for b, events in enumerate(PATIENTS):
        alone = controls([events]).u(t[b:b + 1], K)[0]
        torch.testing.assert_close(batched[b], alone)
        np.testing.assert_allclose(batched[b].numpy(), reference_u(events, t[b].numpy()), rtol=1e-12, atol=0)
    # a scalar time (as inside the ODE field) gives (B, n_drugs)
    torch.testing.assert_close(c.u(torch.tensor(0.3, dtype=torch.float64), K), batched[:, 3])
    # per-patient rates: patient rows use their own k
    k_b = torch.stack([K, 2 * K, K])
    torch.testing.assert_close(c.u(t, k_b)[1], controls([PATIENTS[1]]).u(t[1:2], 2 * K)[0])


def test_padding_is_ignored():
    c = controls(PATIENTS)
    padded = controls([events + [(math.nan, "", math.nan)] * 3 for events in PATIENTS])
    t = torch.linspace(0, 0.6, 7, dtype=torch.float64).expand(3, -1)
    torch.testing.assert_close(padded.u(t, K), c.u(t, K))
    torch.testing.assert_close(padded.cumulative_dose(t), c.cumulative_dose(t))


def test_u_is_right_continuous_at_dose_times():
    c = controls(PATIENTS)
    at = torch.tensor([0.10, 0.05, 0.25], dtype=torch.float64)  # a dose time of each patient
    before = c.u(at - 1e-12, K)
    jump = c.u(at, K) - before
    torch.testing.assert_close(jump, torch.tensor([[150.0, 0.0], [0.0, 10.0], [80.0, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_rhs_jump_times_are_the_sorted_unique_drug_times():
    c = controls(PATIENTS + [[(0.30, TMZ, 1.0)]])  # a repeated time
    torch.testing.assert_close(c.rhs_jump_times(),
                               torch.tensor([-0.1, 0.05, 0.10, 0.20, 0.25, 0.30], dtype=torch.float64))


def test_state_jumps_are_the_fractions():
    c = controls(PATIENTS)
    jumps = c.state_jumps(RT, apply=lambda d, n: d)
    torch.testing.assert_close(jumps.time, torch.tensor([[0.15, 0.16], [math.nan] * 2, [0.4, math.nan]],
                                                        dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(jumps.amount, torch.tensor([[2.0, 2.0], [math.nan] * 2, [1.8, math.nan]],
                                                          dtype=torch.float64), equal_nan=True)
    with pytest.raises(ValueError, match="not a fraction agent"):
        c.state_jumps(TMZ, apply=lambda d, n: d)


def test_solve_with_controls_matches_the_closed_form():
    """dN/dt = -C_tmz(t) with N <- N exp(-0.3 d) at each fraction, through the solver, against the
    exact answer: drug loss is the integral of C between fractions, kills scale what is left."""
    c = controls(PATIENTS)
    pk = tx.OneCompartment(float(K[0]), 1.0)
    jumps = c.state_jumps(apply=lambda d, gy: d * torch.exp(-0.3 * gy)[:, None])
    times = torch.tensor([[0.2, 0.5]] * 3, dtype=torch.float64)
    out = solve(lambda t, d: -c.u(t, K)[:, :1], torch.ones(3, 1, dtype=torch.float64), times,
                rhs_jumps=c.rhs_jump_times(), state_jumps=jumps, solver=Solver(rtol=1e-8, atol=1e-10))[..., 0]
    for b, events in enumerate(PATIENTS):
        drug = tx.doses(events, TMZ)
        for j, t in enumerate(times[b].tolist()):
            n, last = 1.0, 0.0
            for tf, gy in zip(*tx.doses(events, RT)):
                if 0 < tf <= t:
                    n = (n - tx.concentration_integral(last, tf, *drug, pk)) * math.exp(-0.3 * gy)
                    last = tf
            n -= tx.concentration_integral(last, t, *drug, pk)
            assert out[b, j].item() == pytest.approx(n, rel=1e-6, abs=1e-8)


def test_exposure_summaries():
    c = controls(PATIENTS)
    t = torch.tensor([[0.0, 0.1, 0.2, 0.5]] * 3, dtype=torch.float64)
    cum = c.cumulative_dose(t)  # (B, T, A): tmz, dmt, rt
    assert cum.shape == (3, 4, 3)
    torch.testing.assert_close(cum[0], torch.tensor([[0, 0, 0], [150, 0, 0], [150, 10, 4], [250, 10, 4]],
                                                    dtype=torch.float64))
    torch.testing.assert_close(cum[2, :, 0], torch.tensor([50, 50, 50, 130], dtype=torch.float64))
    since = c.time_since_last_dose(t)
    assert since[0, 1, 0] == 0.0  # right-continuous: the dose at 0.1 is the last one at 0.1
    assert torch.isinf(since[1, :, 0]).all() and torch.isinf(since[1, 0, 1])
    torch.testing.assert_close(since[2, :, 0], torch.tensor([0.1, 0.2, 0.3, 0.25], dtype=torch.float64))
    assert c.time_since_last_dose(t, never=-1.0)[1, 0, 0] == -1.0
    assert c.cumulative_dose(0.2).shape == (3, 3)


def test_unknown_agents_are_errors_not_dropped():
    with pytest.raises(InputError, match="'cisplatin' is not one of the model's agents"):
        controls([[(0.1, "cisplatin", 1.0)]])
    with pytest.raises(InputError, match="dose >= 0"):
        controls([[(0.1, TMZ, -1.0)]])


def test_controls_from_a_scenario_set():
    s = load_scenarios(EXAMPLES / "glioma.toml")
    events = s.events_for(last_visit=1.0)
    c = controls_from_events(list(events.values()), (TMZ, RT), dtype=torch.float64)
    assert c.of(RT)[0].shape == (5, 30) and c.of(TMZ)[0].shape == (5, 70)
    assert torch.isnan(c.of(TMZ)[0][1]).all()  # radiotherapy alone
    assert c.u(0.0, 30.0).shape == (5, 1)
