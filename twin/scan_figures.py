"""Figures of the scan twin's results: predicted scans, their uncertainty and change, volumes, scenario arms.

Pure plotting: each function reads a scan result (`docs/results-format.md`, "Scan results") and
returns a matplotlib `Figure`; nothing is written (`twin.report` saves and embeds figures). The
figures are built as `matplotlib.figure.Figure` objects rather than through pyplot, so they hold
no global state and are freed like any object: a report of fifty figures needs no `plt.close`.

Display: a 2D scan (y, x) is drawn as stored; of a 3D scan (z, y, x) the middle axial slice
`z = Z // 2` is drawn. Rows run upwards (`origin="lower"`), so with RAS index order anterior (or
superior, for a coronal slice) is up and the subject's right is on the right. Times are on the
cohort's clock (attribute `clock`), horizons in years after the subject's last observed visit.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .figures import ARM_COLOURS, _bands, _finite

INTENSITY, SPREAD, CHANGE = "gray", "magma", "RdBu_r"
MATCH = 0.1  # years: an observed visit this near a requested time is drawn above its prediction
COLUMN, BAR = 2.2, 0.07  # inches of figure per image column; a colour bar column's width relative to an image


def scan_timeline(result: xr.Dataset, subject: str, cohort: xr.Dataset | None = None, channel: str | None = None,
                  arm: str | None = None):
    """One subject's scans on a grid, one column per time shown, one channel.

    Column 0 is the reference scan: the latest scan the twin started from among the subject's
    requests, at its time. Then one column per requested time (padding dropped), in request order.
    Rows: (1) observed: the reference in column 0; in a request column the cohort's observed scan
    nearest the requested time if one lies within `MATCH` (0.1) years of it (it may be a visit the
    twin did not see, such as a held-out later one), else a blank axis reading "not observed"
    (always blank without `cohort`: image (subject, visit, channel, *space), time, observed,
    baseline_time); (2) the point forecast (scan_mean); (3) the per-voxel predictive sd; (4) mean - that
    request's reference scan (diverging, symmetric limits). Rows 1 and 2 share one intensity scale.
    Each colour bar has its own narrow column on the right: intensity (rows 1-2), sd, change.
    `channel` defaults to the first, `arm` (scenario results) to `factual`. Width about 2.2 inches
    per column.
    """
    s, valid = _requests(result, subject)
    c, channel = _channel(result, channel)
    a, arm = _arm(result, arm)
    pick = {"subject": s, "request": valid, "channel": c}
    mean, spread = _values(result, "scan_mean", pick, a), _values(result, "scan_spread", pick, a)
    reference = _values(result, "reference_scan", pick, a)
    change = mean - reference
    times, horizons = result["time"].values[s, valid], result["horizon"].values[s, valid]
    ref_times = result["reference_time"].values[s, valid]
    last = int(np.nanargmax(ref_times)) if np.isfinite(ref_times).any() else 0
    seen = [None] * len(valid)  # per request: (observed time, scan) or None
    if cohort is not None:
        seen_times, scans = _observed(cohort, subject, channel)
        for r, t in enumerate(times):
            if seen_times.size:
                k = int(np.argmin(np.abs(seen_times - t)))
                if abs(seen_times[k] - t) <= MATCH:
                    seen[r] = (seen_times[k], scans[k])
    limits = _limits(reference[last], mean, *[scan for _, scan in filter(None, seen)])
    top = float(np.nanmax(spread)) if np.isfinite(spread).any() else 1.0
    bound = _symmetric(change)

    columns = 1 + len(valid)
    fig = _figure(COLUMN * columns + 1.0, 8.4)
    grid = fig.add_gridspec(4, columns + 1, width_ratios=[1] * columns + [BAR])
    ref_title = f"reference {ref_times[last]:.2f}" if np.isfinite(ref_times[last]) else "reference"
    first = _image(fig.add_subplot(grid[0, 0]), reference[last], INTENSITY, limits, ref_title)
    first.set_ylabel("observed", fontsize=8)
    for r in range(len(valid)):
        ax = fig.add_subplot(grid[0, 1 + r])
        if seen[r] is not None:
            _image(ax, seen[r][1], INTENSITY, limits, f"observed {seen[r][0]:.2f}")
        else:
            _blank(ax, "not observed" if cohort is not None else "")
    rows = []
    for r in range(len(valid)):
        # A fill may start each request from a different scan; say so where it is not column 0's.
        frm = f"vs {ref_times[r]:.2f}" if ref_times[r] != ref_times[last] else ""
        rows.append((_image(fig.add_subplot(grid[1, 1 + r]), mean[r], INTENSITY, limits,
                            f"{times[r]:.2f} ({horizons[r]:+.2f} y)"),
                     _image(fig.add_subplot(grid[2, 1 + r]), spread[r], SPREAD, (0.0, top or 1.0), ""),
                     _image(fig.add_subplot(grid[3, 1 + r]), change[r], CHANGE, (-bound, bound), frm)))
    # The row names fill column 0's empty cells, so no label widens the gap before column 1.
    for k, label in enumerate(("point forecast", "predictive sd", "change from\nreference")):
        _blank(fig.add_subplot(grid[1 + k, 0]), label, right=True)
    for where, image, label in ((grid[0:2, -1], first, "intensity"), (grid[2, -1], rows[0][1], "sd"),
                                (grid[3, -1], rows[0][2], "change")):
        _bar(fig, where, image, label)
    _suptitle(fig, f"{subject}, {channel}{f', arm {arm}' if arm else ''}: times are {_clock(result)}, in brackets "
                   f"the horizon after the last visit{_where(result)}")
    return fig


def volume_fan(result: xr.Dataset, subject: str, structure: str, cohort_volumes=None, arm: str | None = None):
    """The derived volume of one structure over the requested times: mean and central bands.

    One arm (or a forecast/fill result): the mean with every central band shaded (the outer
    quantile pair lightest, the inner darker). A scenario result with `arm=None`: every arm in its
    own colour, mean and outermost band. Requests whose scan failed a plausibility check are
    ringed in red. cohort_volumes: optional (times on the cohort's clock (T,), volumes (T,)) of
    the structure as measured, drawn as black dots. One axes.
    """
    s, valid = _requests(result, subject)
    names = [str(n) for n in result["structure"].values]
    if structure not in names:
        raise ValueError(f"structure {structure!r} is not in the result (it has {names})")
    k = names.index(structure)
    unit = str(result["structure_unit"].values[k]) if "structure_unit" in result.coords else ""
    if "arm" in result.dims and arm is None:
        arms = [(i, str(a)) for i, a in enumerate(result["arm"].values)]
    else:
        arms = [_arm(result, arm)]
    times = result["time"].values[s, valid]
    bands = _bands(result)
    fig = _figure(5.2, 3.4)
    ax = fig.add_subplot()
    cycle = iter(f"C{i}" for i in range(10) if f"C{i}" not in ("C0", "C2", "C3"))
    for a, name in arms:
        colour = ARM_COLOURS.get(name) or (next(cycle) if name else "tab:blue")
        pick = {"subject": s, "request": valid, "structure": k}
        mean = _values(result, "volume_mean", pick, a)
        q = _finite(_values(result, "volume_quantiles", pick, a))  # (Q, R)
        shown = bands if len(arms) == 1 else bands[:1]
        for j, (lo, hi, cover) in enumerate(shown):
            ax.fill_between(times, q[lo], q[hi], color=colour, alpha=0.15 + 0.2 * j, lw=0,
                            label=f"{cover:.0%} band" + (f": {name}" if len(arms) > 1 else ""))
        ax.plot(times, mean, "o-", color=colour, lw=1.8, ms=3, label="mean" + (f": {name}" if len(arms) > 1 else ""))
        if "scan_flags" in result:
            flagged = _values(result, "scan_flags", {"subject": s, "request": valid}, a).any(axis=0)
            if flagged.any():
                ax.plot(times[flagged], mean[flagged], "o", mfc="none", mec="tab:red", ms=9, mew=1.5,
                        label="scan flagged implausible" if a == arms[0][0] else None)
    if cohort_volumes is not None:
        at, volumes = (np.asarray(v, dtype=np.float64) for v in cohort_volumes)
        ax.plot(at, volumes, "o", color="black", ms=4, label="measured")
    ax.set_xlabel(_clock(result), fontsize=8)
    ax.set_ylabel(f"{structure} [{unit}]" if unit else structure, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"{subject}: {structure.replace('_', ' ')} from the predicted scans", fontsize=9)
    return fig


def scenario_scans(result: xr.Dataset, subject: str, time_index: int, channel: str | None = None):
    """A scenario result at one of the subject's requested times (`time_index` counts its
    non-padding requests from 0): per channel (all, or `channel`), a row of the mean scan under
    each arm and below it the reference scan then arm - factual for every other arm (diverging,
    symmetric limits). Each row's colour bar has its own narrow column on the right: intensity
    beside the means (the reference below shares it), difference beside the differences. Axes per
    channel: 2 x arms images and 2 colour bars (1 with a single arm). Width about 2.2 inches per arm.
    """
    if "arm" not in result.dims:
        raise ValueError("scenario_scans needs a scenario result (with an arm dim); use scan_timeline")
    s, valid = _requests(result, subject)
    if not 0 <= time_index < len(valid):
        raise ValueError(f"time_index {time_index} out of range: {subject!r} has {len(valid)} requested times")
    r = int(valid[time_index])
    arms = [str(a) for a in result["arm"].values]
    factual = arms.index("factual") if "factual" in arms else 0
    everything = list(enumerate(map(str, result["channel"].values)))
    channels = [_channel(result, channel)] if channel is not None else everything
    fig = _figure(COLUMN * len(arms) + 1.0, 4.2 * len(channels) + 0.4)
    grid = fig.add_gridspec(2 * len(channels), len(arms) + 1, width_ratios=[1] * len(arms) + [BAR])
    for row, (c, name) in enumerate(channels):
        pick = {"subject": s, "request": r, "channel": c}
        means = [_values(result, "scan_mean", pick, a) for a in range(len(arms))]
        reference = _values(result, "reference_scan", pick, factual)
        differences = {a: means[a] - means[factual] for a in range(len(arms)) if a != factual}
        limits = _limits(reference, *means)
        bound = _symmetric(*differences.values())
        tops = [_image(fig.add_subplot(grid[2 * row, a]), means[a], INTENSITY, limits, arms[a])
                for a in range(len(arms))]
        ref_time = result["reference_time"].values[s, r]
        below = _image(fig.add_subplot(grid[2 * row + 1, 0]), reference, INTENSITY, limits,
                       f"reference scan ({ref_time:.2f})")
        diffs = [_image(fig.add_subplot(grid[2 * row + 1, 1 + j]), d, CHANGE, (-bound, bound),
                        f"{arms[a]} - {arms[factual]}") for j, (a, d) in enumerate(differences.items())]
        tops[0].set_ylabel(f"{name}: mean", fontsize=8)
        below.set_ylabel(f"{name}", fontsize=8)
        _bar(fig, grid[2 * row, -1], tops[0], "intensity")
        if diffs:
            _bar(fig, grid[2 * row + 1, -1], diffs[0], "difference")
    t, h = result["time"].values[s, r], result["horizon"].values[s, r]
    _suptitle(fig, f"{subject} at {_clock(result)} {t:.2f} ({h:+.2f} y after the last visit): each arm's mean "
                   f"scan and its difference from {arms[factual]}{_where(result)}")
    return fig


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _requests(result: xr.Dataset, subject: str) -> tuple[int, np.ndarray]:
    """(subject index, indices of its requests that are not padding)."""
    names = [str(s) for s in result["subject"].values]
    if subject not in names:
        raise ValueError(f"subject {subject!r} is not in the result (it has {names[:5]})")
    s = names.index(subject)
    valid = np.flatnonzero(np.isfinite(result["time"].values[s]))
    if not len(valid):
        raise ValueError(f"subject {subject!r} has no requested times in the result")
    return s, valid


def _channel(result: xr.Dataset, channel: str | None) -> tuple[int, str]:
    names = [str(c) for c in result["channel"].values]
    if channel is None:
        return 0, names[0]
    if channel not in names:
        raise ValueError(f"channel {channel!r} is not in the result (it has {names})")
    return names.index(channel), channel


def _arm(result: xr.Dataset, arm: str | None) -> tuple[int | None, str | None]:
    """(index, name) of the arm to draw; (None, None) for a result without arms."""
    if "arm" not in result.dims:
        if arm is not None:
            raise ValueError(f"arm {arm!r} given, but the result has no arms (it is not a scenario result)")
        return None, None
    names = [str(a) for a in result["arm"].values]
    arm = arm if arm is not None else ("factual" if "factual" in names else names[0])
    if arm not in names:
        raise ValueError(f"arm {arm!r} is not in the result (it has {names})")
    return names.index(arm), arm


def _values(result: xr.Dataset, name: str, pick: dict, arm: int | None) -> np.ndarray:
    """`result[name]` at `pick`, and at `arm` where the variable has an arm dim."""
    var = result[name]
    pick = {d: i for d, i in pick.items() if d in var.dims}
    if "arm" in var.dims:
        pick["arm"] = arm
    return np.asarray(var.isel(pick).values)


def _observed(cohort: xr.Dataset, subject: str, channel: str) -> tuple[np.ndarray, np.ndarray]:
    """(clock times (V,), scans (V, *space)) of the subject's observed visits in the cohort."""
    from twin.data.schema import subject_slice

    if "image" not in cohort:
        raise ValueError("the cohort has no images")
    if channel not in [str(c) for c in cohort["channel"].values]:
        raise ValueError(f"channel {channel!r} is not in the cohort (it has {list(cohort['channel'].values)})")
    one = subject_slice(cohort, subject)
    seen = np.flatnonzero(one["observed"].values)
    times = one["time"].values[seen] + float(one["baseline_time"])
    return times, one["image"].sel(channel=channel).values[seen]


def _image(ax, scan: np.ndarray, cmap: str, limits: tuple[float, float], title: str):
    """Draw a 2D scan or the middle axial slice of a 3D one on `ax`; returns `ax`."""
    plane = scan[scan.shape[0] // 2] if scan.ndim == 3 else scan
    ax.imshow(plane, cmap=cmap, vmin=limits[0], vmax=limits[1], origin="lower", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    return ax


def _blank(ax, text: str, right: bool = False):
    """An empty grid cell that keeps its column's place, with `text` in the middle (or at the right, in black)."""
    ax.set_axis_off()
    if text:
        x, align, colour, size = (0.95, "right", "black", 8) if right else (0.5, "center", "0.4", 7)
        ax.text(x, 0.5, text, ha=align, va="center", fontsize=size, color=colour, transform=ax.transAxes)
    return ax


def _bar(fig, where, ax, label: str):
    """The colour bar of `ax`'s image in its own grid cell `where`, so it never lies over an image."""
    bar = fig.colorbar(ax.images[0], cax=fig.add_subplot(where))
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return bar


def _suptitle(fig, text: str, fontsize: float = 9):
    """A figure title wrapped to the figure's width, so a narrow figure does not cut it."""
    import textwrap

    # About 0.6 em per character: lines of this many characters fit the width.
    width = int(fig.get_figwidth() * 72 / (0.6 * fontsize))
    fig.suptitle(textwrap.fill(text, max(width, 20)), fontsize=fontsize)


def _limits(*scans: np.ndarray) -> tuple[float, float]:
    """One intensity scale for scans drawn side by side: robust (1st to 99.5th percentile)."""
    values = np.concatenate([np.ravel(s) for s in scans])
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    low, high = np.percentile(values, [1, 99.5])
    return float(low), float(high if high > low else low + 1)


def _symmetric(*changes: np.ndarray) -> float:
    """Limit of a diverging scale: no change is the middle colour, whatever the sign of the largest."""
    values = np.concatenate([np.ravel(np.abs(c)) for c in changes]) if changes else np.zeros(0)
    values = values[np.isfinite(values)]
    bound = float(np.percentile(values, 99.5)) if values.size else 0.0
    return bound if bound > 0 else 1.0


def _clock(result: xr.Dataset) -> str:
    return str(result.attrs.get("clock") or "time on the cohort's clock")


def _where(result: xr.Dataset) -> str:
    if "z" in result.dims:
        return f"; middle axial slice z = {result.sizes['z'] // 2} of {result.sizes['z']}"
    return ""
