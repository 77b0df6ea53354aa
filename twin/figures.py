"""Figures for people: one patient's visits over time, the twin's forecasts and its treatment scenarios.

Plotting reads a cohort (or a subject's slice of one) and the twin's results (`docs/results-format.md`)
and returns a matplotlib `Figure`; it computes nothing that the library does not already provide,
and writes nothing (`twin.report` saves and embeds figures). Figures are built as
`matplotlib.figure.Figure` objects, not through pyplot, so they hold no global state and are freed
like any object. Time runs in years since the subject's baseline; results, which are on the
cohort's clock, are shifted onto it.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from twin.data.schema import subject_slice

# One colour per scenario arm, the same in every figure; arms beyond these take the cycle's next.
ARM_COLOURS = {"factual": "tab:blue", "alternative": "tab:green", "untreated": "tab:red"}


def _middle_slice(image: np.ndarray) -> np.ndarray:
    """(Y, X) as is, or the middle axial slice of (Z, Y, X); rotated so anterior/superior is up."""
    if image.ndim == 3:
        image = image[image.shape[0] // 2]
    return np.flipud(image)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _finite(a: np.ndarray) -> np.ndarray:
    """NaN for +-inf: an unbounded band (too few calibration cases) is left undrawn, not drawn to infinity."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def _bands(result: xr.Dataset) -> list[tuple[int, int, float]]:
    """(index of lower quantile, index of upper quantile, nominal coverage) of each central band, outermost first."""
    levels = [float(q) for q in result["quantile"].values]
    return [(i, levels.index(min(levels, key=lambda v: abs(v - (1 - q)))), round(1 - 2 * q, 6))
            for i, q in enumerate(levels) if q < 0.5]


def _subject_result(result: xr.Dataset, subject: str, baseline: float) -> tuple[xr.Dataset, np.ndarray]:
    """One subject's part of a result with its padding dropped, and its times in years since baseline (R,)."""
    names = [str(s) for s in result["subject"].values]
    if subject not in names:
        raise ValueError(f"subject {subject!r} is not in the result (it has {names[:5]})")
    one = result.isel(subject=names.index(subject))
    keep = np.flatnonzero(np.isfinite(one["time"].values))
    one = one.isel(request=keep)
    return one, one["time"].values - baseline


def _units(ds: xr.Dataset) -> list[str]:
    if "biomarker_unit" not in ds.coords:
        return [""] * ds.sizes["biomarker"]
    return [str(u) for u in ds["biomarker_unit"].values]


def _panel_label(ax, name: str, unit: str) -> None:
    ax.set_title(name.replace("_", " "), fontsize=9)
    ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)


def plot_forecast(ds: xr.Dataset, result: xr.Dataset, subject: str, *, seen: np.ndarray | None = None,
                  reference: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, fill: xr.Dataset | None = None,
                  title: str | None = None):
    """A fan chart per biomarker of one subject: the twin's mean with its central bands, over the visits.

    ds: the cohort holding the subject, with every visit (a simulated cohort's `truth_biomarkers`
    factual is drawn as a thin line). result: a forecast result (`BiomarkerTwin.forecast`) of the
    subject, best on a dense grid of times. seen: (V,) the subject's visits the twin was conditioned
    on (default: all observed); observed visits not seen are drawn hollow, as held out. reference:
    {label: (times on the cohort's clock (R,), values (R, B))}, drawn dashed (a baseline such as
    copy-last). fill: a fill result holding the subject: its means at the filled times as diamonds
    with the outermost band as an error bar. One axes per biomarker.
    """
    one = subject_slice(ds, subject)
    base = float(one["baseline_time"])
    times, observed = one["time"].values, one["observed"].values
    seen = observed if seen is None else np.asarray(seen, bool)[: len(times)] & observed
    values = one["biomarkers"].values
    res, t = _subject_result(result, subject, base)
    mean, q = res["mean"].values, _finite(res["quantiles"].values)  # (R, B), (Q, R, B)
    bands = _bands(result)
    names, units = [str(b) for b in one["biomarker"].values], _units(one)
    fig = _figure(3.4 * len(names), 3.3)
    axes = fig.subplots(1, len(names), squeeze=False)
    for b, ax in enumerate(axes[0]):
        for k, (lo, hi, cover) in enumerate(bands):
            ax.fill_between(t, q[lo, :, b], q[hi, :, b], color="tab:blue", alpha=0.15 + 0.2 * k, lw=0,
                            label=f"twin {cover:.0%} band")
        ax.plot(t, mean[:, b], color="tab:blue", lw=1.8, label="twin mean")
        if "truth_biomarkers" in one:
            truth = one["truth_biomarkers"].sel(scenario="factual").values[:, b]
            ax.plot(times, truth, color="black", lw=0.8, label="truth (noise-free)")
        for label, (at, pred) in (reference or {}).items():
            ax.plot(np.asarray(at) - base, np.asarray(pred)[:, b], "--", color="tab:orange", lw=1.4, label=label)
        ax.plot(times[seen], values[seen, b], "o", color="black", ms=5, label="visit seen by the twin")
        held = observed & ~seen
        if held.any():
            ax.plot(times[held], values[held, b], "o", mfc="white", mec="black", ms=5, label="held-out measurement")
        if seen.any() and held.any():
            ax.axvline(times[seen].max(), color="0.5", ls=":", lw=1)
        if fill is not None:
            f, tf = _subject_result(fill, subject, base)
            fq = _finite(f["quantiles"].values)
            lo, hi, cover = bands[0]
            fm = f["mean"].values[:, b]
            ax.errorbar(tf, fm, yerr=np.abs(np.stack([fm - fq[lo, :, b], fq[hi, :, b] - fm])), fmt="D",
                        color="tab:red", ms=6, capsize=3, zorder=5, label=f"twin fill, {cover:.0%} band")
        _panel_label(ax, names[b], units[b])
        ax.set_xlabel("years since baseline", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 8), fontsize=7, frameon=False)
    fig.suptitle(title or f"{subject}: twin forecast", fontsize=10)
    return fig


def plot_scenario(ds: xr.Dataset, result: xr.Dataset, subject: str, *, title: str | None = None):
    """One subject under each arm of a scenario result: the twin's mean and the edges of its outermost band per arm.

    Arms named like the cohort's simulated scenarios (`factual`, `untreated`, `alternative`) get
    that scenario's `truth_biomarkers` drawn beside them, dashed with markers at the planned
    visits. Ticks along the bottom mark each arm's treatment events: the cohort's own for
    `factual`, the result's recorded schedules (`BiomarkerTwin.simulate` with explicit events)
    for the others. One axes per biomarker.
    """
    import json

    import matplotlib

    one = subject_slice(ds, subject)
    base = float(one["baseline_time"])
    times = one["time"].values
    res, t = _subject_result(result, subject, base)
    arms = [str(a) for a in result["arm"].values]
    truth_scenarios = [str(s) for s in one["scenario"].values] if "truth_biomarkers" in one else []
    lo, hi, cover = _bands(result)[0]
    events = {"factual": [float(e) for e in one["event_time"].values]} if "event_time" in one else {}
    recorded = json.loads(result.attrs.get("scenario", "{}")).get("events", {})
    for arm, schedules in recorded.items():
        events[arm] = [float(e[0]) for e in schedules.get(subject, [])]
    cycle = iter(c for c in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] if c not in ARM_COLOURS.values())
    colour = {arm: ARM_COLOURS.get(arm) or next(cycle) for arm in arms}
    names, units = [str(b) for b in one["biomarker"].values], _units(one)
    fig = _figure(3.4 * len(names), 3.3)
    axes = fig.subplots(1, len(names), squeeze=False)
    for b, ax in enumerate(axes[0]):
        for a, arm in enumerate(arms):
            q = _finite(res["quantiles"].isel(arm=a).values)
            # band edges as lines, not shading: three overlapping shaded bands read as one grey block
            ax.plot(t, q[lo, :, b], color=colour[arm], lw=0.6, alpha=0.6,
                    label=f"twin {cover:.0%} band: {arm}" if b == 0 else None)
            ax.plot(t, q[hi, :, b], color=colour[arm], lw=0.6, alpha=0.6)
            ax.plot(t, res["mean"].isel(arm=a).values[:, b], color=colour[arm], lw=2, label=f"twin mean: {arm}")
            if arm in truth_scenarios:
                truth = one["truth_biomarkers"].sel(scenario=arm).values[:, b]
                ax.plot(times, truth, "--", marker="o", ms=3.5, color=colour[arm], lw=1.2, label=f"truth: {arm}")
            ticks = [e for e in events.get(arm, []) if np.isfinite(e)]
            ax.plot(ticks, np.full(len(ticks), 0.015 + 0.03 * a), "|", color=colour[arm], ms=5,
                    transform=ax.get_xaxis_transform())
        _panel_label(ax, names[b], units[b])
        ax.set_xlabel("years since baseline", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 9), fontsize=7, frameon=False)
    fig.suptitle(title or f"{subject}: treatment scenarios (thin lines: twin {cover:.0%} band; ticks: treatment "
                          "events)", fontsize=10)
    return fig


def plot_visits(ds: xr.Dataset, subject: str, *, channel: str | None = None):
    """One row per channel of acquired scans at every planned visit (missed ones marked), a row of
    noise-free truth where the cohort carries it, and the subject's biomarkers over time."""
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
    fig = _figure(1.9 * n_cols, 1.9 * len(rows) + (2.6 if has_bio else 0))
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
    return fig
