"""Treatment events as the control inputs of the patient-state ODE, batched over patients.

Each patient of a batch (B) has their own events (time, agent, dose). They become, per agent,
NaN-padded tensors of dose times and doses (B, E), and from those what the dynamics need:

    u(t)               drug concentrations (B, n_drugs): one-compartment bolus superposition,
                       C_a(t) = sum_{t_i <= t} d_i / V_a exp(-k_a (t - t_i)), right-continuous
    rhs_jump_times()   every drug dose time in the batch: the ODE's right-hand side jumps there,
                       so the adaptive solver must end a step at each (`solve(rhs_jumps=...)`)
    state_jumps(...)   radiotherapy-like agents act at an instant on the state itself
                       (`solve(state_jumps=...)`), e.g. with `twin.priors.radiotherapy.lq_jump`

and exposure summaries for the history encoder's visit tokens: cumulative dose and time since
the last dose, per agent. Agents named in `fractions` (radiotherapy by default) are fraction
agents; every other agent is a drug.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from twin.dynamics.ode import JumpFn, StateJumps
from twin.errors import InputError
from twin.priors.pharmacology import concentration

from .schedule import RADIOTHERAPY, Event


@dataclass(frozen=True)
class ControlSchedule:
    """Per agent, dose times and doses (B, E_a), NaN-padded, each row sorted by time.

    agents: every agent, in the order of the exposure features; fractions: the fraction agents
    among them (state jumps); the others are `drugs` (concentrations, in `u`'s order).
    """

    agents: tuple[str, ...]
    fractions: tuple[str, ...]
    dose_time: tuple[Tensor, ...]
    dose: tuple[Tensor, ...]

    def __post_init__(self):
        if not self.agents:
            raise ValueError("a ControlSchedule needs at least one agent")
        if len(self.dose_time) != len(self.agents) or len(self.dose) != len(self.agents):
            raise ValueError(f"need one dose_time and one dose tensor per agent ({len(self.agents)}), "
                             f"got {len(self.dose_time)} and {len(self.dose)}")
        shapes = {tuple(t.shape[:1]) for t in (*self.dose_time, *self.dose)}
        if len(shapes) > 1 or any(t.shape != d.shape or t.dim() != 2 for t, d in zip(self.dose_time, self.dose)):
            raise ValueError("dose_time and dose must be (B, E_a) per agent with the same B, got "
                             f"{[tuple(t.shape) for t in self.dose_time]} and {[tuple(d.shape) for d in self.dose]}")
        unknown = [a for a in self.fractions if a not in self.agents]
        if unknown:
            raise ValueError(f"fraction agents {unknown} are not among the agents {list(self.agents)}")

    @property
    def batch(self) -> int:
        return self.dose_time[0].shape[0]

    @property
    def drugs(self) -> tuple[str, ...]:
        return tuple(a for a in self.agents if a not in self.fractions)

    def of(self, agent: str) -> tuple[Tensor, Tensor]:
        """(dose_time, dose), each (B, E_a), of one agent."""
        if agent not in self.agents:
            raise KeyError(f"no agent {agent!r}; agents: {', '.join(self.agents)}")
        a = self.agents.index(agent)
        return self.dose_time[a], self.dose[a]

    def u(self, t: Tensor | float, k: float | Tensor, volume: float | Tensor = 1.0) -> Tensor:
        """Drug concentrations at t: () or (B,) -> (B, n_drugs); (B, T) -> (B, T, n_drugs).

        k (elimination rates, 1/year) and volume: a number (every drug), (n_drugs,) (one per
        drug) or (B, n_drugs) (per patient and drug). Right-continuous: at a dose time the dose
        is already in.
        """
        columns = []
        for j, agent in enumerate(self.drugs):
            time, dose = self.of(agent)
            columns.append(concentration(t, time, dose, _for_drug(k, j, "k"), _for_drug(volume, j, "volume")))
        if not columns:  # radiotherapy only, say
            grid, squeeze = self._times(t)
            return grid.new_zeros(*grid.shape[: 1 if squeeze else 2], 0)
        return torch.stack(columns, dim=-1)

    def rhs_jump_times(self) -> Tensor:
        """Every drug dose time in the batch, sorted and unique, (N,)."""
        times = [self.of(a)[0].reshape(-1) for a in self.drugs]
        t = torch.cat(times) if times else self.dose_time[0].new_zeros(0)
        return torch.unique(t[torch.isfinite(t)])  # sorted

    def state_jumps(self, agent: str = RADIOTHERAPY, *, apply: JumpFn) -> StateJumps:
        """The fractions of `agent` as state jumps: time and amount (dose, Gy) (B, E), NaN-padded."""
        if agent not in self.fractions:
            raise ValueError(f"{agent!r} is not a fraction agent (fractions: {list(self.fractions)}); "
                             "drugs act through u(t)")
        time, dose = self.of(agent)
        return StateJumps(time=time, amount=dose, apply=apply)

    def cumulative_dose(self, t: Tensor | float) -> Tensor:
        """Total dose given up to and including t, per agent: (B, A), or (B, T, A) for t (B, T)."""
        grid, squeeze = self._times(t)
        out = []
        for time, dose in zip(self.dose_time, self.dose):
            given = time[:, None, :] <= grid[..., None]  # (B, T, E); NaN padding compares False
            out.append(torch.where(given, dose[:, None, :], torch.zeros_like(given, dtype=dose.dtype)).sum(-1))
        return self._stack(out, grid, squeeze)

    def time_since_last_dose(self, t: Tensor | float, never: float = math.inf) -> Tensor:
        """t minus the last dose time <= t, per agent: (B, A) or (B, T, A); `never` where none yet."""
        grid, squeeze = self._times(t)
        out = []
        for time in self.dose_time:
            given = time[:, None, :] <= grid[..., None]  # (B, T, E)
            # a column of -inf first, so a patient (or agent) without doses has a max too
            stamps = torch.where(given, time[:, None, :], torch.full_like(given, -math.inf, dtype=time.dtype))
            last = torch.cat([torch.full_like(grid[..., None], -math.inf), stamps], dim=-1).amax(-1)
            out.append(torch.where(torch.isfinite(last), grid - last, torch.full_like(grid, never)))
        return self._stack(out, grid, squeeze)

    def _times(self, t) -> tuple[Tensor, bool]:
        ref = self.dose_time[0]
        t = torch.as_tensor(t, dtype=ref.dtype, device=ref.device)
        if t.dim() == 0:
            return t.expand(self.batch)[:, None], True
        if t.dim() == 1 and t.shape[0] == self.batch:
            return t[:, None], True
        if t.dim() == 2 and t.shape[0] == self.batch:
            return t, False
        raise ValueError(f"times must be a scalar, ({self.batch},) or ({self.batch}, T), got shape {tuple(t.shape)}")

    def _stack(self, columns: list[Tensor], grid: Tensor, squeeze: bool) -> Tensor:
        out = torch.stack(columns, dim=-1)  # (B, T, A)
        out = torch.where(torch.isnan(grid)[..., None], torch.full_like(out, math.nan), out)
        return out[:, 0] if squeeze else out


def controls_from_events(
    events: Sequence[Iterable[Event]],
    agents: Sequence[str],
    *,
    fractions: Sequence[str] = (RADIOTHERAPY,),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ControlSchedule:
    """Per-patient event lists [(time, agent, dose), ...] (length B) -> a ControlSchedule.

    agents: every agent the model knows, in feature order; an event of another agent is an
    error (it would otherwise be silently ignored). fractions: which of them act as state jumps
    (names not in `agents` are ignored, so the default suits a drug-only model). Padding rows of
    a cohort's arrays (NaN time, empty agent) are skipped.
    """
    agents = tuple(str(a) for a in agents)
    if not agents or len(set(agents)) != len(agents) or not all(agents):
        raise ValueError(f"agents must be one or more distinct non-empty names, got {list(agents)}")
    dtype = dtype or torch.get_default_dtype()
    per_agent: dict[str, list[list[tuple[float, float]]]] = {a: [] for a in agents}
    for b, patient in enumerate(events):
        rows: dict[str, list[tuple[float, float]]] = {a: [] for a in agents}
        for k, (t, agent, dose) in enumerate(patient):
            if agent == "" and not math.isfinite(float(t)):
                continue  # cohort padding
            if agent not in rows:
                raise InputError(f"agent {agent!r} is not one of the model's agents: {', '.join(agents)}",
                                 source="events", field=f"patient {b}, event {k}")
            if not (math.isfinite(float(t)) and math.isfinite(float(dose)) and float(dose) >= 0):
                raise InputError(f"expected a finite time and a finite dose >= 0, got ({t}, {agent!r}, {dose})",
                                 source="events", field=f"patient {b}, event {k}")
            rows[agent].append((float(t), float(dose)))
        for a in agents:
            per_agent[a].append(sorted(rows[a], key=lambda r: r[0]))  # stable
    batch = len(events)
    times, doses = [], []
    for a in agents:
        width = max((len(r) for r in per_agent[a]), default=0)
        time = torch.full((batch, width), math.nan, dtype=dtype)
        dose = torch.full((batch, width), math.nan, dtype=dtype)
        for b, rows in enumerate(per_agent[a]):
            if rows:
                values = torch.tensor(rows, dtype=torch.float64)
                time[b, : len(rows)], dose[b, : len(rows)] = values[:, 0].to(dtype), values[:, 1].to(dtype)
        times.append(time.to(device))
        doses.append(dose.to(device))
    return ControlSchedule(agents, tuple(a for a in agents if a in set(fractions)), tuple(times), tuple(doses))


def _for_drug(value: float | Tensor, j: int, name: str) -> float | Tensor:
    """A per-drug parameter for drug j: a number, (n_drugs,) -> a 0-d tensor, (B, n_drugs) -> (B,)."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return value
    if value.dim() == 1:
        return value[j]
    if value.dim() == 2:
        return value[:, j]
    raise ValueError(f"{name} must be a number, (n_drugs,) or (B, n_drugs), got shape {tuple(value.shape)}")
