"""Twin results as xarray Datasets: assembling them, storing them as zarr, exporting them as CSV.

The layout is documented in `docs/results-format.md`. In short, for S subjects with up to R
requested times each, B biomarkers and Q quantile levels:

    time        (subject, request)                 on the cohort's clock; NaN pads a subject's requests
    horizon     (subject, request)                 years after the subject's last observed visit
    mean        ([arm,] subject, request, biomarker)
    quantiles   ([arm,] quantile, subject, request, biomarker)    calibrated bands
    samples     ([arm,] sample, subject, request, biomarker)      only when asked for
    flags       ([arm,] check, subject, request, biomarker)       True = implausible
    effect_mean, effect_quantiles                  scenario results only: arm - factual

`write_result` writes a store atomically (a hidden sibling renamed into place, like cohort
stores); `export_result_table` writes one CSV row per subject, [arm,] time and biomarker.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import xarray as xr

from twin.errors import InputError

from .atomic import partial_folder

FORMAT = "twin-result/1"
KINDS = ("forecast", "fill", "scenario")


def quantile_name(level: float) -> str:
    """Column name of a quantile level: 0.05 -> "q05", 0.5 -> "q50", 0.975 -> "q97.5"."""
    percent = round(100 * float(level), 6)  # 100 * 0.05 is 5.000000000000001
    return f"q{int(percent):02d}" if percent.is_integer() else f"q{percent:g}"


def build_result(*, kind: str, subjects, biomarkers, units, clock: str, time: np.ndarray, horizon: np.ndarray,
                 levels, mean: np.ndarray, quantiles: np.ndarray, flags: np.ndarray, checks,
                 reasons: list[str], samples: np.ndarray | None = None, arms=None,
                 effect_mean: np.ndarray | None = None, effect_quantiles: np.ndarray | None = None,
                 attrs: dict | None = None) -> xr.Dataset:
    """Assemble a result Dataset from arrays shaped as in the module docstring (arm axis first when `arms`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    lead = ("arm",) if arms is not None else ()
    cell = ("subject", "request", "biomarker")
    data = {
        "time": (("subject", "request"), np.asarray(time, np.float64), {"long_name": "requested time", "clock": clock}),
        "horizon": (("subject", "request"), np.asarray(horizon, np.float64),
                    {"units": "years", "long_name": "years after the subject's last observed visit (negative: a fill)"}),
        "mean": ((*lead, *cell), mean, {"long_name": "predictive mean of the biomarker"}),
        "quantiles": ((*lead, "quantile", *cell), quantiles,
                      {"long_name": "calibrated predictive quantiles of a measurement"}),
        "flags": ((*lead, "check", *cell), np.asarray(flags, bool),
                  {"long_name": "plausibility check failed on the mean (True = implausible)"}),
    }
    if samples is not None:
        data["samples"] = ((*lead, "sample", *cell), samples, {"long_name": "predictive draws of a measurement"})
    if effect_mean is not None:
        data["effect_mean"] = ((*lead, *cell), effect_mean, {"long_name": "mean of the paired differences arm - factual"})
        data["effect_quantiles"] = ((*lead, "quantile", *cell), effect_quantiles,
                                    {"long_name": "quantiles of the paired differences arm - factual (uncalibrated)"})
    coords = {"subject": np.asarray([str(s) for s in subjects], dtype=object),
              "request": np.arange(np.shape(time)[1]),
              "biomarker": np.asarray([str(b) for b in biomarkers], dtype=object),
              "biomarker_unit": ("biomarker", np.asarray([str(u) for u in units], dtype=object)),
              "quantile": np.asarray(levels, np.float64),
              "check": np.asarray(list(checks), dtype=object)}
    if arms is not None:
        coords["arm"] = np.asarray(list(arms), dtype=object)
    ds = xr.Dataset({k: xr.Variable(d, v, a) for k, (d, v, a) in data.items()}, coords=coords)
    ds.attrs.update({"twin_result": FORMAT, "kind": kind, "clock": clock, "flag_reasons": json.dumps(reasons),
                     **(attrs or {})})
    return ds


def write_result(result: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a result as a zarr store, atomically: a failed or killed write leaves `path` as it was."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError("already exists; choose another path or overwrite it", source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with partial_folder(path) as partial:
        out = result.copy()
        for var in out.variables.values():
            var.encoding = {}
        out.to_zarr(partial, mode="w-", zarr_format=3, consolidated=False)
    return path


def open_result(path: str | os.PathLike) -> xr.Dataset:
    """Read a result store into memory; anything else at `path` is an InputError naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError("no result store at this path", source=str(path))
    try:
        ds = xr.open_zarr(path, consolidated=False).load()
    except Exception as err:  # zarr raises a zoo of types for a damaged store
        raise InputError(f"not a readable zarr store ({type(err).__name__}: {err})", source=str(path)) from None
    if ds.attrs.get("twin_result") != FORMAT:
        raise InputError(f"not a twin result (expected attribute twin_result = {FORMAT!r})", source=str(path),
                         field="twin_result")
    for name in ("subject", "biomarker", "biomarker_unit", "check", "arm"):
        if name in ds.coords:  # strings read back as fixed-width unicode; keep one dtype
            ds[name] = ds[name].astype(object)
    return ds


def result_rows(result: xr.Dataset) -> list[list[str]]:
    """The CSV rows (header first) of `export_result_table`."""
    levels = [float(q) for q in result["quantile"].values]
    names = [quantile_name(q) for q in levels]
    scenario = "arm" in result.dims
    header = ["subject", *(["arm"] if scenario else []), "time", "biomarker", "mean", *names]
    if scenario:
        header += ["effect_mean", *(f"effect_{n}" for n in names)]
    rows = [header]
    arms = [str(a) for a in result["arm"].values] if scenario else [None]
    time = result["time"].values
    for s, subject in enumerate(map(str, result["subject"].values)):
        for a, arm in enumerate(arms):
            pick = {"arm": a} if scenario else {}
            mean = result["mean"].isel(pick).values
            quant = result["quantiles"].isel(pick).values
            if scenario:
                eff, eff_q = result["effect_mean"].isel(pick).values, result["effect_quantiles"].isel(pick).values
            for r in np.flatnonzero(np.isfinite(time[s])):
                for b, marker in enumerate(map(str, result["biomarker"].values)):
                    row = [subject, *([arm] if scenario else []), _cell(time[s, r]), marker, _cell(mean[s, r, b]),
                           *(_cell(quant[q, s, r, b]) for q in range(len(levels)))]
                    if scenario:
                        row += [_cell(eff[s, r, b]), *(_cell(eff_q[q, s, r, b]) for q in range(len(levels)))]
                    rows.append(row)
    return rows


def export_result_table(result: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write one row per subject, [arm,] time and biomarker: subject,[arm,]time,biomarker,mean,q05,...,q95
    (scenario results add effect_mean,effect_q05,...), time on the cohort's clock; atomically."""
    from twin.data.table import write_rows_atomic

    path = Path(path)
    write_rows_atomic({path: result_rows(result)})
    return path


def _cell(x: float) -> str:
    """Shortest text that reads back as the same float64; empty for NaN, 'inf' for an unbounded band."""
    x = float(x)
    return "" if math.isnan(x) else repr(x)
