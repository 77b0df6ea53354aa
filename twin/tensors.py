"""From a cohort Dataset to the model's tensors, and the standardisation that goes with them.

The model works on standardised biomarkers ((value - mean) / scale, per biomarker) and
standardised covariates; volumes (unit mL) whose every value is positive are standardised on
the log scale, where a head's size is an offset rather than a factor on every change and
measurement noise proportional to the volume has one spread. Volumes that can be 0 (a
tumour's, after treatment) stay linear: tried as log(value + a tenth of the median), they
forecast worse on the glioma benchmark (bench/biomarker_bench.py) because the sigmoid decoder
then spends its range on the near-zero region; the baseline on the cohort's clock (age, for most cohorts) is the
first covariate. `Standardiser` holds those constants; it is part of a checkpoint, so a model
applied to new patients scales them exactly as its training cohort was scaled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import xarray as xr

from twin.errors import InputError

from .model import Batch

RADIOTHERAPY = "radiotherapy"  # the agent whose events are fractions in Gy, not drug doses


@dataclass(frozen=True)
class Standardiser:
    biomarker: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    covariate: tuple[str, ...]  # "baseline_time" first, then the cohort's covariates
    x_mean: tuple[float, ...]
    x_scale: tuple[float, ...]
    agents: tuple[str, ...]  # drugs the model knows; radiotherapy and others are ignored
    dose_scale: tuple[float, ...]  # a typical dose per agent, EC50's starting point
    radiotherapy: bool = False  # the cohort received radiotherapy fractions (agent "radiotherapy", Gy)
    log_shift: tuple[float, ...] = ()  # per biomarker: log(value + shift) when finite, linear when NaN (empty: all linear)

    @classmethod
    def from_cohort(cls, ds: xr.Dataset) -> Standardiser:
        if "biomarkers" not in ds:
            raise InputError("the biomarker twin needs a cohort with biomarkers", source="cohort", field="biomarkers")
        y = np.where(ds["observed"].values[..., None], ds["biomarkers"].values, np.nan)
        units = [str(u) for u in ds["biomarker_unit"].values] if "biomarker_unit" in ds.coords else [""] * y.shape[-1]
        log_shift = tuple(_log_shift(y[..., b]) if u == "mL" else math.nan for b, u in enumerate(units))
        y = _forward(y, log_shift)
        mean, scale = np.nanmean(y, axis=(0, 1)), np.nanstd(y, axis=(0, 1))
        x = _covariates(ds)
        x_mean, x_scale = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
        agents = sorted({str(a) for a in np.asarray(ds["event_agent"].values).ravel()} - {"", RADIOTHERAPY})
        dose = ds["event_dose"].values
        dose_scale = [float(np.nanmedian(dose[np.asarray(ds["event_agent"].values) == a])) for a in agents]
        return cls(tuple(map(str, ds["biomarker"].values)), _tuple(mean), _tuple(np.where(scale > 0, scale, 1.0)),
                   ("baseline_time", *map(str, ds["covariate"].values)) if "covariate" in ds.coords else ("baseline_time",),
                   _tuple(x_mean), _tuple(np.where(x_scale > 0, x_scale, 1.0)), tuple(agents),
                   _tuple(np.maximum(dose_scale, 1e-6)),
                   bool((np.asarray(ds["event_agent"].values) == RADIOTHERAPY).any()), log_shift)

    def standardise(self, values: np.ndarray) -> np.ndarray:
        """Biomarker values (..., B) in their units -> the model's scale."""
        return (_forward(np.asarray(values, dtype=np.float64), self.log_shift) - np.asarray(self.mean)) / np.asarray(self.scale)

    def values(self, standardised: np.ndarray) -> np.ndarray:
        """The model's scale (..., B) -> biomarker values in their units (inverse of `standardise`)."""
        out = np.asarray(standardised, dtype=np.float64) * np.asarray(self.scale) + np.asarray(self.mean)
        if not self.log_shift:
            return out
        shift = np.asarray(self.log_shift)
        logged = np.isfinite(shift)
        return np.where(logged, np.exp(np.where(logged, out, 0.0)) - np.where(logged, shift, 0.0), out)

    def to_dict(self) -> dict:
        """JSON-ready (strict JSON has no NaN: a linear biomarker's shift is None)."""
        d = asdict(self)
        d["log_shift"] = [None if math.isnan(v) else v for v in self.log_shift]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Standardiser:
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if "log_shift" in d:
            d["log_shift"] = tuple(math.nan if v is None else float(v) for v in d["log_shift"])
        return cls(**d)

    def batch(self, ds: xr.Dataset, times: np.ndarray | None = None, *, events: str = "event") -> Batch:
        """The cohort's patients as a Batch: measured values, or the query `times` (S, T) with nothing measured.

        events: which schedule to give the model, the received one ("event") or, on simulated
        cohorts, the "alternative_event" one.
        """
        biomarker = tuple(map(str, ds["biomarker"].values))
        if biomarker != self.biomarker:
            raise InputError(f"the model knows biomarkers {list(self.biomarker)}, the cohort has {list(biomarker)}",
                             source="cohort", field="biomarker")
        observed = ds["observed"].values
        y = self.standardise(np.where(observed[..., None], ds["biomarkers"].values, np.nan))
        t = np.where(observed, ds["time"].values, np.nan)
        if times is not None:
            t, y = np.asarray(times, dtype=np.float64), np.full((*np.shape(times), len(biomarker)), np.nan)
        x = _covariates(ds)
        if x.shape[1] != len(self.covariate):
            raise InputError(f"the model knows covariates {list(self.covariate[1:])}, the cohort has "
                             f"{x.shape[1] - 1}", source="cohort", field="covariate")
        x = (x - np.asarray(self.x_mean)) / np.asarray(self.x_scale)
        x = np.where(np.isfinite(x), x, 0.0)  # a missing covariate sits at the cohort mean
        agent = np.asarray(ds[f"{events}_agent"].values).astype(str)
        event_time, event_dose = ds[f"{events}_time"].values, ds[f"{events}_dose"].values

        def of(name):
            mine = agent == name
            return _t(np.where(mine, event_time, np.nan)), _t(np.where(mine, event_dose, np.nan))

        fractions = of(RADIOTHERAPY) if self.radiotherapy else None
        return Batch(_t(t), _t(y), _t(x), tuple(of(a) for a in self.agents), fractions)


def _log_shift(y: np.ndarray) -> float:
    """0 (log scale) for a volume whose every value is positive, NaN (linear) otherwise."""
    y = y[np.isfinite(y)]
    return 0.0 if y.size and y.min() > 0 else math.nan


def _forward(values: np.ndarray, log_shift: tuple[float, ...]) -> np.ndarray:
    if not log_shift:
        return values
    shift = np.asarray(log_shift)
    logged = np.isfinite(shift)
    with np.errstate(invalid="ignore", divide="ignore"):  # a value below -shift becomes NaN/-inf, not a crash
        return np.where(logged, np.log(np.where(logged, values + np.where(logged, shift, 0.0), 1.0)), values)


def _covariates(ds: xr.Dataset) -> np.ndarray:
    base = ds["baseline_time"].values[:, None]
    return np.concatenate([base, ds["covariates"].values], axis=1) if "covariates" in ds else base


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def _tuple(a) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(a).ravel())
