"""What a simulator returns for one subject: the acquired data and the truth behind it.

Each simulator (`atrophy`, `glioma`) produces one `SubjectSim` per subject from its own
random generator; `simulate` stacks them into cohort blocks. Keeping the per-subject record
plain arrays keeps the physics free of xarray and storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from twin.errors import InputError


@dataclass(frozen=True)
class SimulatorSpec:
    """Names that every subject of one simulator shares (the cohort's coordinates)."""

    kind: str
    channel: tuple[str, ...]
    biomarker: tuple[str, ...]
    biomarker_units: tuple[str, ...]
    covariate: tuple[str, ...]
    parameter: tuple[str, ...]
    labels: tuple[str, ...]  # truth_labels value k+1 is labels[k]; 0 is background
    clock: str  # the cohort's own clock, e.g. "age (years)"


@dataclass
class SubjectSim:
    """One simulated subject. V planned visits, C channels, B biomarkers; space is (Y, X) or (Z, Y, X).

    Scenario axis (first axis of truth arrays, length 3): factual, untreated, alternative.
    """

    time: np.ndarray  # (V,) planned visit times, years since baseline; time[0] == 0
    observed: np.ndarray  # (V,) bool, False for a missed visit (baseline never missed)
    image: np.ndarray  # (V, C, *space) as acquired: noise, bias field, misregistration; NaN where missed
    truth_image: np.ndarray  # (3, V, C, *space) noise-free, at every planned visit
    truth_labels: np.ndarray  # (V, *space) uint8 label map of the factual truth
    biomarkers: np.ndarray  # (V, B) as measured; NaN where missed
    truth_biomarkers: np.ndarray  # (3, V, B) noise-free
    covariates: np.ndarray  # (K,)
    parameters: np.ndarray  # (P,) true per-subject parameters
    mask: np.ndarray  # (*space) bool, the brain
    affine: np.ndarray  # (4, 4) voxel-to-world, RAS mm
    baseline_time: float  # baseline on the cohort's clock
    events: list[tuple[float, str, float]] = field(default_factory=list)  # received schedule
    alternative_events: list[tuple[float, str, float]] = field(default_factory=list)


def config_from_dict(cls: type, values: dict):
    """A simulator's config dataclass from a parsed YAML/JSON mapping; unknown keys raise `InputError`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown key(s) {unknown}; expected some of {sorted(known)}", source=cls.__name__)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
