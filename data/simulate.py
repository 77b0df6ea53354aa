"""Simulated cohorts with ground truth: subjects drawn one by one, stacked into cohort blocks.

`simulate` is what `twin simulate` and the demo call. It draws each subject from its own
generator, `numpy.random.SeedSequence([seed, index])`, so subject i is the same whatever the
number of subjects, the block size or the order of generation, and a cohort is a function of
(kind, n_subjects, dims, size, seed, config) alone; all of them are recorded in the attrs.
Each subject starts from the MNI152 template warped by a subject-specific deformation
(`anatomy.subject_anatomy`); the simulator (`atrophy`, `glioma`) then grows its disease.

Blocks are yielded as they are made so that `write_cohort` can stream a cohort larger than
memory to disk; every block has the same dims (events are padded to the simulator's
capacity), as a zarr append requires.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import xarray as xr

from twin.errors import InputError

from .schema import ALT_EVENT, PARAMETER, SCENARIO, SCENARIOS, SUBJECT, VISIT, cohort, events_array
from .subject_sim import SimulatorSpec, SubjectSim


@dataclass(frozen=True)
class Simulator:
    """One kind of simulated disease: its names, its config type, one subject, its event capacity."""

    spec: SimulatorSpec
    config: type
    subject: Callable  # (anatomy, rng, cfg) -> SubjectSim
    event_capacity: Callable  # cfg -> most events one subject can receive under any schedule


def simulators() -> dict[str, Simulator]:
    """The registered simulators by kind (imported here, so `twin.data` loads without them)."""
    from . import atrophy, glioma

    return {
        "atrophy": Simulator(atrophy.ATROPHY, atrophy.AtrophyConfig, atrophy.atrophy_subject, atrophy.event_capacity),
        "glioma": Simulator(glioma.GLIOMA, glioma.GliomaConfig, glioma.glioma_subject, glioma.event_capacity),
    }


def simulate(
    kind: str,
    n_subjects: int,
    dims: int = 2,
    seed: int = 0,
    *,
    size: int = 64,
    config=None,
    block: int = 8,
    progress: bool = True,
) -> Iterator[xr.Dataset]:
    """Yield cohort blocks of up to `block` subjects (ids `sim-0001`, ...), each one validated.

    kind: "atrophy" or "glioma". dims: 2 (a coronal slice, `size` x `size`) or 3 (`size`^3), on
    a ~3 mm grid. config: the simulator's config dataclass (default: its defaults).
    """
    table = simulators()
    if kind not in table:
        raise InputError(f"expected one of {sorted(table)}, got {kind!r}", source="simulate", field="kind")
    if dims not in (2, 3):
        raise InputError(f"expected 2 or 3, got {dims!r}", source="simulate", field="dims")
    if n_subjects < 1 or block < 1:
        raise InputError(f"need n_subjects >= 1 and block >= 1, got {n_subjects} and {block}", source="simulate")
    sim = table[kind]
    cfg = sim.config() if config is None else config
    if not isinstance(cfg, sim.config):
        raise InputError(f"expected a {sim.config.__name__}, got {type(cfg).__name__}", source="simulate", field="config")
    from tqdm.auto import tqdm

    from .anatomy import subject_anatomy, template

    base = template(dims, size)
    capacity = sim.event_capacity(cfg)
    attrs = {"kind": kind, "seed": int(seed), "dims": int(dims), "size": int(size), "n_subjects": int(n_subjects),
             "config": json.dumps(asdict(cfg)), "simulator": f"twin.data.{kind}",
             "anatomy": "MNI152 (nilearn), subject-specific smooth deformation"}
    bar = tqdm(total=n_subjects, desc=f"simulating {kind} {dims}D", unit="subject", disable=not progress)
    with bar:
        for start in range(0, n_subjects, block):
            subjects = []
            for i in range(start, min(start + block, n_subjects)):
                rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
                subjects.append(sim.subject(subject_anatomy(base, rng), rng, cfg))
                bar.update(1)
            ids = [f"sim-{i + 1:04d}" for i in range(start, start + len(subjects))]
            yield stack(sim.spec, ids, subjects, capacity, attrs)


def simulate_cohort(kind: str, n_subjects: int, dims: int = 2, seed: int = 0, **kwargs) -> xr.Dataset:
    """The whole simulated cohort in memory (small cohorts, tests, notebooks)."""
    return xr.concat(list(simulate(kind, n_subjects, dims, seed, **kwargs)), dim=SUBJECT,
                     data_vars="minimal", coords="minimal", compat="override", combine_attrs="override")


def stack(spec: SimulatorSpec, ids: list[str], subjects: list[SubjectSim], capacity: int, attrs: dict) -> xr.Dataset:
    """Subjects of one simulator as one cohort block, ground truth included; events padded to `capacity`."""
    most = max(max(len(s.events), len(s.alternative_events)) for s in subjects)
    if most > capacity:
        raise AssertionError(f"{spec.kind}: a subject has {most} events, above the declared capacity {capacity}")

    def padded(events):  # every block gets `capacity` slots: zarr appends need equal dims
        time, agent, dose = events_array(events)
        extra = ((0, 0), (0, capacity - time.shape[1]))
        agents = np.full((len(events), capacity), "", dtype=object)  # np.pad would fill with np.str_
        agents[:, : agent.shape[1]] = agent
        return np.pad(time, extra, constant_values=np.nan), agents, np.pad(dose, extra, constant_values=np.nan)

    ds = cohort(
        subject=ids,
        time=np.stack([s.time for s in subjects]),
        observed=np.stack([s.observed for s in subjects]),
        image=np.stack([s.image for s in subjects]),
        channel=spec.channel,
        affine=np.stack([s.affine for s in subjects]),
        mask=np.stack([s.mask for s in subjects]),
        biomarkers=np.stack([s.biomarkers for s in subjects]),
        biomarker=spec.biomarker,
        biomarker_units=spec.biomarker_units,
        covariates=np.stack([s.covariates for s in subjects]),
        covariate=spec.covariate,
        baseline_time=np.array([s.baseline_time for s in subjects]),
        clock=spec.clock,
        attrs=attrs,
    )
    ds = _pad_events(ds, "event", padded([s.events for s in subjects]))
    space = [d for d in ds["image"].dims if d in ("z", "y", "x")]
    truth = {
        "truth_image": ((SCENARIO, SUBJECT, VISIT, "channel", *space),
                        np.stack([s.truth_image for s in subjects], axis=1).astype(np.float32),
                        {"long_name": "noise-free image at every planned visit"}),
        "truth_biomarkers": ((SCENARIO, SUBJECT, VISIT, "biomarker"),
                             np.stack([s.truth_biomarkers for s in subjects], axis=1),
                             {"long_name": "noise-free biomarkers"}),
        "truth_labels": ((SUBJECT, VISIT, *space), np.stack([s.truth_labels for s in subjects]).astype(np.uint8),
                         {"long_name": "label map of the factual truth", "labels": json.dumps(list(spec.labels))}),
        "truth_parameters": ((SUBJECT, PARAMETER), np.stack([s.parameters for s in subjects]).astype(np.float64),
                             {"long_name": "true per-subject parameters"}),
    }
    ds = ds.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in truth.items()})
    ds = ds.assign_coords({SCENARIO: np.asarray(SCENARIOS, dtype=object), PARAMETER: np.asarray(spec.parameter, dtype=object)})
    alt_time, alt_agent, alt_dose = padded([s.alternative_events for s in subjects])
    ds = ds.assign({
        f"{ALT_EVENT}_time": ((SUBJECT, ALT_EVENT), alt_time, {"units": "years", "long_name": "alternative schedule: event time since baseline"}),
        f"{ALT_EVENT}_agent": ((SUBJECT, ALT_EVENT), alt_agent, {"long_name": "alternative schedule: agent"}),
        f"{ALT_EVENT}_dose": ((SUBJECT, ALT_EVENT), alt_dose, {"long_name": "alternative schedule: dose"}),
    }).assign_coords({ALT_EVENT: np.arange(capacity)})
    return ds


def _pad_events(ds: xr.Dataset, dim: str, arrays) -> xr.Dataset:
    """Replace the event variables by ones padded to a fixed number of slots."""
    time, agent, dose = arrays
    out = ds.drop_vars([f"{dim}_time", f"{dim}_agent", f"{dim}_dose", dim])
    return out.assign({
        f"{dim}_time": ((SUBJECT, dim), time, ds[f"{dim}_time"].attrs),
        f"{dim}_agent": ((SUBJECT, dim), agent, ds[f"{dim}_agent"].attrs),
        f"{dim}_dose": ((SUBJECT, dim), dose, ds[f"{dim}_dose"].attrs),
    }).assign_coords({dim: np.arange(time.shape[1])})
