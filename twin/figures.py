"""Figures for people: one patient's visits over time.

Plotting reads a cohort (or a subject's slice of one) and writes a PNG; it computes nothing
that the library does not already provide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from twin.data.schema import subject_slice


def _middle_slice(image: np.ndarray) -> np.ndarray:
    """(Y, X) as is, or the middle axial slice of (Z, Y, X); rotated so anterior/superior is up."""
    if image.ndim == 3:
        image = image[image.shape[0] // 2]
    return np.flipud(image)


def plot_visits(ds: xr.Dataset, subject: str, path: str | Path, *, channel: str | None = None) -> Path:
    """One row per channel of acquired scans at every planned visit (missed ones marked), a row of
    noise-free truth where the cohort carries it, and the subject's biomarkers over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = subject_slice(ds, subject).load()
    times = one["time"].values
    observed = one["observed"].values
    channels = [str(c) for c in one["channel"].values] if "image" in one else []
    if channel is not None:
        channels = [channel]
    rows = [("image", c) for c in channels]
    if "truth_image" in one:
        rows += [("truth_image", c) for c in channels[:1]]
    has_bio = "biomarkers" in one
    n_cols = max(len(times), 1)
    fig = plt.figure(figsize=(1.9 * n_cols, 1.9 * len(rows) + (2.6 if has_bio else 0)), constrained_layout=True)
    grid = fig.add_gridspec(len(rows) + (1 if has_bio else 0), n_cols)
    clock_shift = float(one["baseline_time"])
    for r, (var, c) in enumerate(rows):
        data = one[var].sel(scenario="factual") if var == "truth_image" else one[var]
        data = data.sel(channel=c).values
        finite = data[np.isfinite(data)]
        vmin, vmax = (np.percentile(finite, [1, 99.5]) if finite.size else (0, 1))
        for v in range(len(times)):
            ax = fig.add_subplot(grid[r, v])
            ax.set_xticks([]), ax.set_yticks([])
            if var == "image" and not observed[v]:
                ax.text(0.5, 0.5, "missed", ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set_facecolor("0.93")
            else:
                # row 0 is inferior (2D) or posterior (axial middle slice): RAS index order
                ax.imshow(_middle_slice(data[v]), cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
            if r == 0:
                ax.set_title(f"t = {times[v]:.2f} y", fontsize=8)
            if v == 0:
                ax.set_ylabel(f"{c}\n{'truth' if var == 'truth_image' else 'acquired'}", fontsize=8)
    if has_bio:
        ax = fig.add_subplot(grid[len(rows), :])
        values = one["biomarkers"].values
        for k, name in enumerate(one["biomarker"].values):
            series = values[:, k]
            ok = observed & np.isfinite(series)
            if not ok.any():
                continue
            scale = np.nanmax(np.abs(series[ok])) or 1.0
            ax.plot(times[ok], series[ok] / scale, "o-", label=str(name), ms=4)
        for t in one["event_time"].values:
            ax.axvline(t, color="tab:red", alpha=0.15, lw=1)
        ax.set_xlabel(f"years since baseline ({one.attrs.get('clock', '')} at baseline: {clock_shift:g}); red: treatment events")
        ax.set_ylabel("value / max")
        ax.legend(fontsize=7, ncol=4, loc="best")
    fig.suptitle(f"{subject}: {int(observed.sum())} visits observed, {int((~observed).sum())} missed", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
