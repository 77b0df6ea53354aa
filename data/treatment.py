"""Treatment physics of the simulators: drug pharmacokinetics, drug effect, radiotherapy kill.

The simulators' ground truth, written in numpy and independently of the model's priors in
`twin.priors` (so that a model recovering it is evidence, not an echo). Time is in years
since the subject's baseline; an event is one administration `(time, agent, dose)`.

One-compartment pharmacokinetics, bolus doses d_i at times t_i (superposition):

    C(t) = sum_{t_i <= t} d_i / V * exp(-k (t - t_i)),      k = ln 2 / half-life

C is right-continuous: at a dose time it already includes that dose. Emax effect and its exact
integral between doses (C(s) = C_a exp(-k (s - a)) there, so the integral is closed-form):

    E(C) = Emax C / (EC50 + C)
    int_a^b E(C(s)) ds = Emax / k * ln((EC50 + C_a) / (EC50 + C_a exp(-k (b - a))))

Linear-quadratic survival of one radiotherapy fraction of d Gy:

    S(d) = exp(-alpha d - beta d^2)

Schedule builders (`course`, `radiotherapy`, `stupp`) return event lists; day 0 of a schedule
is taken to be a Monday, a day is 1 / 365.25 years.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from twin.errors import InputError

DAY = 1.0 / 365.25  # years
HOUR = DAY / 24.0
RADIOTHERAPY = "radiotherapy"  # dose in Gy per fraction
TEMOZOLOMIDE = "temozolomide"  # dose in mg

Event = tuple[float, str, float]  # (time in years since baseline, agent, dose)


@dataclass(frozen=True)
class OneCompartment:
    """One-compartment pharmacokinetics: elimination rate k (1/year), volume V (L)."""

    k: float
    volume: float

    def __post_init__(self):
        if not (self.k > 0 and self.volume > 0):
            raise InputError(f"k and volume must be positive, got k={self.k}, volume={self.volume}",
                             source="OneCompartment")

    @classmethod
    def from_half_life(cls, half_life: float, volume: float) -> OneCompartment:
        """From the elimination half-life in years: k = ln 2 / half-life."""
        if not half_life > 0:
            raise InputError(f"half-life must be positive, got {half_life}", source="OneCompartment",
                             field="half_life")
        return cls(k=float(np.log(2.0) / half_life), volume=float(volume))

    @property
    def half_life(self) -> float:
        return float(np.log(2.0) / self.k)


def doses(events: Iterable[Event], agent: str) -> tuple[np.ndarray, np.ndarray]:
    """The (times, doses) of one agent's events, sorted by time: two (N,) float64 arrays."""
    picked = sorted((float(t), float(d)) for t, a, d in events if a == agent)
    if not picked:
        return np.zeros(0), np.zeros(0)
    t, d = np.asarray(picked).T
    return t, d


def concentration(t, dose_times, dose_amounts, pk: OneCompartment) -> np.ndarray:
    """C(t) by superposition of bolus doses; t any shape, doses (N,). Right-continuous at doses."""
    t = np.asarray(t, dtype=np.float64)
    dose_times = np.asarray(dose_times, dtype=np.float64)
    dose_amounts = np.asarray(dose_amounts, dtype=np.float64)
    lag = t[..., None] - dose_times  # (..., N)
    given = lag >= 0
    # exp of a negative lag is masked out, not evaluated, so far-future doses cannot overflow
    decay = np.exp(-pk.k * np.where(given, lag, 0.0))
    return (np.where(given, decay, 0.0) * dose_amounts).sum(-1) / pk.volume


def concentration_integral(a: float, b: float, dose_times, dose_amounts, pk: OneCompartment) -> float:
    """int_a^b C(s) ds, exact: each dose contributes d/(V k) (exp(-k(a'-t_i)) - exp(-k(b-t_i)))."""
    if b < a:
        raise InputError(f"interval end {b} before its start {a}", source="concentration_integral")
    total = 0.0
    for t_i, d_i in zip(np.asarray(dose_times, float), np.asarray(dose_amounts, float)):
        if t_i >= b:
            continue
        start = max(a, t_i)
        total += d_i / (pk.volume * pk.k) * (np.exp(-pk.k * (start - t_i)) - np.exp(-pk.k * (b - t_i)))
    return float(total)


def emax_effect(c, emax: float, ec50: float) -> np.ndarray:
    """E(C) = Emax C / (EC50 + C); E(EC50) = Emax / 2."""
    c = np.asarray(c, dtype=np.float64)
    return emax * c / (ec50 + c)


def effect_integral(a: float, b: float, dose_times, dose_amounts, pk: OneCompartment,
                    emax: float, ec50: float) -> float:
    """int_a^b E(C(s)) ds, exact: cut at the doses inside (a, b), closed form on each piece."""
    if b < a:
        raise InputError(f"interval end {b} before its start {a}", source="effect_integral")
    dose_times = np.asarray(dose_times, dtype=np.float64)
    cuts = np.unique(np.concatenate([[a], dose_times[(dose_times > a) & (dose_times < b)], [b]]))
    total = 0.0
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        c_lo = float(concentration(lo, dose_times, dose_amounts, pk))
        total += emax / pk.k * np.log((ec50 + c_lo) / (ec50 + c_lo * np.exp(-pk.k * (hi - lo))))
    return float(total)


def lq_survival(d, alpha: float, beta: float) -> np.ndarray:
    """Surviving fraction after one fraction of d Gy: S(d) = exp(-alpha d - beta d^2)."""
    d = np.asarray(d, dtype=np.float64)
    return np.exp(-alpha * d - beta * d * d)


def course(start: float, every: float, count: int, dose: float, agent: str,
           per_cycle: int = 5, gap: float = DAY) -> list[Event]:
    """Repeating cycles: `count` cycles `every` years apart, each `per_cycle` doses `gap` apart.

    E.g. adjuvant temozolomide, days 1-5 of each 28-day cycle for 6 cycles:
    `course(t0, 28 * DAY, 6, 300.0, TEMOZOLOMIDE)`.
    """
    if count < 0 or per_cycle < 1 or dose < 0 or every <= 0 or gap <= 0:
        raise InputError(f"need count >= 0, per_cycle >= 1, dose >= 0, every > 0, gap > 0; got count={count}, "
                         f"per_cycle={per_cycle}, dose={dose}, every={every}, gap={gap}", source="course")
    return [(start + c * every + j * gap, agent, float(dose)) for c in range(count) for j in range(per_cycle)]


def radiotherapy(start: float, fractions: int = 30, dose_gy: float = 2.0,
                 days: Sequence[int] = (0, 1, 2, 3, 4)) -> list[Event]:
    """`fractions` fractions of `dose_gy` on the given weekdays (0 = Monday = the start day)."""
    weekdays = sorted(set(int(d) for d in days))
    if fractions < 0 or dose_gy < 0 or not weekdays or not all(0 <= d < 7 for d in weekdays):
        raise InputError(f"need fractions >= 0, dose_gy >= 0 and weekdays in 0..6; got fractions={fractions}, "
                         f"dose_gy={dose_gy}, days={list(days)}", source="radiotherapy")
    out: list[Event] = []
    day = 0
    while len(out) < fractions:
        if day % 7 in weekdays:
            out.append((start + day * DAY, RADIOTHERAPY, float(dose_gy)))
        day += 1
    return out


def stupp(start: float, rt_fractions: int = 30, rt_dose_gy: float = 2.0, concomitant_mg: float = 135.0,
          adjuvant_mg: float = 300.0, adjuvant_cycles: int = 6, chemo: bool = True) -> list[Event]:
    """Standard of care for glioblastoma (Stupp): radiotherapy 30 x 2 Gy Mon-Fri with daily
    concomitant temozolomide (75 mg/m^2, about 135 mg) through radiotherapy, then after a 4-week
    break adjuvant temozolomide days 1-5 of 28-day cycles (150-200 mg/m^2, about 300 mg).
    `chemo=False` gives radiotherapy alone. Events sorted by time.
    """
    rt = radiotherapy(start, rt_fractions, rt_dose_gy)
    events = list(rt)
    if chemo and rt:
        rt_days = int(round((rt[-1][0] - start) / DAY)) + 1
        events += course(start, rt_days * DAY, 1, concomitant_mg, TEMOZOLOMIDE, per_cycle=rt_days)
        adjuvant_start = start + (rt_days + 28) * DAY
        events += course(adjuvant_start, 28 * DAY, adjuvant_cycles, adjuvant_mg, TEMOZOLOMIDE)
    # stable sort: same-day radiotherapy stays before the drug, as listed
    return sorted(events, key=lambda e: e[0])
