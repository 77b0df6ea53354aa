"""The `twin` command: a thin shell over the public API.

Each subcommand parses its arguments, calls one or two library functions and prints a short
answer. Bad input ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .errors import InputError

EXIT_BAD_INPUT = 2


def _simulate(args: argparse.Namespace) -> int:
    from twin.data import write_cohort
    from twin.data.simulate import simulate

    blocks = simulate(args.kind, n_subjects=args.subjects, dims=args.dims, seed=args.seed, progress=not args.quiet)
    path = write_cohort(blocks, args.output, overwrite=args.overwrite)
    print(f"wrote {path} ({args.subjects} {args.kind} subjects, {args.dims}D, seed {args.seed})")
    return 0


def _import_bids(args: argparse.Namespace) -> int:
    from twin.data import write_cohort
    from twin.data.bids import import_bids

    ds = import_bids(args.root, resample=args.resample, progress=not args.quiet)
    path = write_cohort(ds, args.output, overwrite=args.overwrite)
    print(f"wrote {path} ({ds.sizes['subject']} subjects, {int(ds['observed'].sum())} visits)")
    return 0


def _import_table(args: argparse.Namespace) -> int:
    from twin.data import write_cohort
    from twin.data.table import import_table

    ds = import_table(args.visits, covariates=args.covariates, events=args.events, clock=args.clock)
    path = write_cohort(ds, args.output, overwrite=args.overwrite)
    print(f"wrote {path} ({ds.sizes['subject']} subjects, {int(ds['observed'].sum())} visits, "
          f"{ds.sizes.get('biomarker', 0)} biomarkers)")
    return 0


def _export_nifti(args: argparse.Namespace) -> int:
    import zarr

    try:
        is_result = "twin_result" in zarr.open_group(args.cohort, mode="r").attrs
    except Exception:  # not a zarr store: open_cohort names the problem
        is_result = False
    if is_result:
        from twin import open_result
        from twin.result_nifti import export_result_nifti

        files = export_result_nifti(open_result(args.cohort), args.output, overwrite=args.overwrite)
        print(f"wrote {len(files)} files under {args.output}")
        return 0
    from twin.data import open_cohort
    from twin.data.export import export_nifti

    ds = open_cohort(args.cohort)
    files = export_nifti(ds, args.output, variables=tuple(args.variables.split(",")), overwrite=args.overwrite)
    print(f"wrote {len(files)} files under {args.output}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from twin.data import open_cohort

    ds = open_cohort(args.cohort)  # raises CohortError listing every problem
    print(f"{args.cohort}: valid ({ds.sizes['subject']} subjects)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from twin.data import describe, open_cohort

    summary = describe(open_cohort(args.cohort))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_format_info(args.cohort, summary))
    return 0


def _format_info(path: str, s: dict) -> str:
    lines = [f"{path}  ({s['kind']})",
             f"  subjects      {s['subjects']}",
             f"  visits        {s['visits']} observed, {s['missed_visits']} missed; per subject "
             f"{s['visits_per_subject']['min']}-{s['visits_per_subject']['max']} (median {s['visits_per_subject']['median']:g})",
             f"  follow-up     median {s['follow_up_years']['median']:.2f} y, max {s['follow_up_years']['max']:.2f} y",
             f"  clock         {s['clock']} (baselines {s['baseline_on_clock']['min']:g} to {s['baseline_on_clock']['max']:g})"]
    if "channels" in s:
        g = s["grid"]
        lines.append(f"  images        {', '.join(s['channels'])} on {'x'.join(map(str, g['shape']))} ({','.join(g['dims'])}), "
                     f"{'x'.join(f'{v:g}' for v in g['spacing_mm'])} mm")
    if "biomarkers" in s:
        lines.append("  biomarkers    " + ", ".join(f"{b} [{v['unit']}]" if v["unit"] else b for b, v in s["biomarkers"].items()))
    if "covariates" in s:
        lines.append("  covariates    " + ", ".join(s["covariates"]))
    lines.append("  events        " + (", ".join(f"{a} x{n}" for a, n in s["events"].items()) or "none"))
    if s["ground_truth"]:
        lines.append("  ground truth  " + ", ".join(s["ground_truth"]))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from twin import BiomarkerTwin, ScanConfig, ScanTwin, TwinConfig
    from twin.data import open_cohort

    ds = open_cohort(args.cohort)
    if args.holdout:
        if not 0 < args.holdout < 1:
            raise InputError(f"expected a fraction in (0, 1), got {args.holdout}", source="options", field="--holdout")
        from twin.metrics import holdout_subjects

        held = holdout_subjects([str(s) for s in ds["subject"].values], args.holdout, args.seed or 0)
        ds = ds.isel(subject=np.flatnonzero(~held))
        print(f"holding out {int(held.sum())} of {held.size} subjects for `twin evaluate`")
    scans = "image" in ds and not args.biomarkers_only
    settings = _read_json(args.config) if args.config else {}
    given = {k: getattr(args, k) for k in ("iterations", "prior_steps", "hidden", "seed", "calibration_fraction")
             if getattr(args, k) is not None}
    if not scans:
        base = TwinConfig.from_dict(settings, source=args.config) if args.config else TwinConfig()
        config = TwinConfig.from_dict({**base.to_dict(), **given}, source="options")
        twin = BiomarkerTwin.fit(ds, config, checkpoint_dir=args.output, overwrite=args.overwrite, progress=not args.quiet)
        first = twin.calibration.groups[0]
        factors = ", ".join(f"{level:g}: x{f:.2f}" for level, f in zip(first.levels, first.factors[0]))
        print(f"wrote {args.output} ({ds.sizes['subject']} subjects, {len(twin.standardiser.biomarker)} biomarkers, "
              f"{config.iterations} + {config.prior_steps} steps, seed {config.seed}; band factors at the shortest "
              f"horizons {factors})")
        return 0
    base = ScanConfig.from_dict(settings, source=args.config) if args.config else ScanConfig()
    dynamics = {**base.dynamics.to_dict(), **given}
    top = {"seed": args.seed} if args.seed is not None else {}
    config = ScanConfig.from_dict({**base.to_dict(), **top, "dynamics": dynamics}, source="options")
    twin = ScanTwin.fit(ds, config, checkpoint_dir=args.output, overwrite=args.overwrite, progress=not args.quiet)
    cal = twin.calibration
    factors = ", ".join(f"{level:g}: x{f:.2f}" for level, f in zip(cal["levels"], cal["voxel"]))
    print(f"wrote {args.output} (scan twin: {ds.sizes['subject']} subjects, channels {', '.join(twin.channels)}, "
          f"{twin.record.get('pairs', 0)} training pairs, seed {config.seed}; voxel band factors {factors})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from twin import load_twin
    from twin.data import open_cohort

    from .evaluation import evaluate
    from .evaluation_report import write_evaluation

    twin = load_twin(args.model)
    ds = open_cohort(args.cohort)
    ev = evaluate(twin, ds, split=args.split, seed=args.seed, n_samples=args.n_samples, progress=not args.quiet)
    report = write_evaluation(ev, args.output, overwrite=args.overwrite)
    m = ev.metrics
    lines = [f"wrote {args.output}: metrics.json, report.html ({m['subjects']} subjects, split {m['split']}, "
             f"against the {m['target']})"]
    metric = "change_rmse" if m.get("data_range") else "biomarker_mae_sd"
    for task in ("forecast", "fill"):
        for key, cell in m[task].items():
            lines.append(f"  {task} <= {key} y (n {cell['n']}): {metric} " + ", ".join(
                f"{method} {cell[method][metric]:.4g}" for method in ("twin", "copy_last", "linear")
                if cell.get(method, {}).get(metric) is not None))
    cal = m["calibration"]
    lines.append(f"  {cal['values']} bands: coverage " + ", ".join(
        f"{v}% {cal[f'coverage_{v}']:.3f}" for v in (50, 80, 90, 95) if cal.get(f"coverage_{v}") is not None))
    if "hallucination" in m:
        h = m["hallucination"]
        lines.append(f"  hallucination: detection {h['detection_rate']:.3f}, false alarms {h['false_alarm_rate']:.3f}")
    print("\n".join(lines) + f"\nopen {report}")
    return 0


def _ask(args: argparse.Namespace, kind: str) -> int:
    from twin import load_twin, write_result
    from twin.data import open_cohort

    twin = load_twin(args.model)
    ds = open_cohort(args.cohort)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    at = args.at or None  # a path: the API reads it and names it in errors
    horizons = _numbers(args.times, "--times") if getattr(args, "times", None) else None
    options = dict(n_samples=args.n_samples, samples=args.samples, seed=args.seed)
    if kind == "forecast":
        result = twin.forecast(ds, subjects, horizons=horizons, at=at, **options)
    elif kind == "fill":
        result = twin.fill(ds, subjects, at=at, **options)
    else:
        extra = {"horizons": horizons} if horizons is not None else {}
        result = twin.simulate(ds, args.scenario, subjects, at=at, **extra, **options)
    path = write_result(result, args.output, overwrite=args.overwrite)
    flagged = int(result["flags"].any("check").sum())
    if "scan_flags" in result:
        flagged += int(result["scan_flags"].any("scan_check").sum())
    arms = f", arms {', '.join(map(str, result['arm'].values))}" if "arm" in result.dims else ""
    print(f"wrote {path} ({kind}: {result.sizes['subject']} subjects, {int(result['time'].notnull().sum())} times{arms}; "
          f"{flagged} values flagged implausible)")
    return 0


def _export_table(args: argparse.Namespace) -> int:
    from twin import export_result_table, open_result

    if Path(args.output).exists() and not args.overwrite:
        raise InputError("already exists; choose another path or overwrite it", source=args.output)
    result = open_result(args.result)
    export_result_table(result, args.output)
    print(f"wrote {args.output} ({result.attrs.get('kind')} on the clock {result.attrs.get('clock')!r})")
    return 0


def _numbers(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated numbers such as 1,2,3, got {text!r}", source=option) from None
    if not values:
        raise InputError(f"expected comma-separated numbers such as 1,2,3, got {text!r}", source=option)
    return values


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no such file", source=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"not readable JSON ({err})", source=path) from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(Path(args.output), seed=args.seed, progress=not args.quiet)
    print(f"demo done: open {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twin", description="Twin: digital twins of patients from longitudinal scans and biomarkers.")
    parser.add_argument("--version", action="version", version=f"twin {__import__('twin').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def writes(p: argparse.ArgumentParser, what: str = "COHORT.zarr") -> None:
        p.add_argument("-o", "--output", required=True, metavar=what, help="where to write")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = command("simulate", "simulate a cohort with ground truth on real anatomy (MNI152)", _simulate)
    p.add_argument("--kind", choices=["atrophy", "glioma"], required=True, help="neurodegeneration or glioma under therapy")
    p.add_argument("--subjects", type=_positive_int, default=20, help="number of subjects (default 20)")
    p.add_argument("--dims", type=int, choices=[2, 3], default=2, help="2D slices (64x64) or 3D volumes (64^3)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cohort")
    writes(p)

    imp = sub.add_parser("import", help="import a BIDS tree or biomarker tables into a cohort store").add_subparsers(
        dest="source", required=True, metavar="SOURCE")
    p = command("bids", "import a BIDS tree: sub-*/ses-*/anat/*.nii[.gz] with sessions.tsv", _import_bids, imp)
    p.add_argument("root", metavar="DIR")
    p.add_argument("--resample", action="store_true",
                   help="resample visits whose grid differs onto the first visit's grid (default: such a mismatch is an error)")
    writes(p)
    p = command("table", "import a long CSV of visits (subject,time,<biomarkers>); leaspy's ID,TIME too", _import_table, imp)
    p.add_argument("visits", metavar="VISITS.csv")
    p.add_argument("--covariates", metavar="C.csv", help="subject,<covariate columns>")
    p.add_argument("--events", metavar="E.csv", help="subject,time,agent,dose (time on the visits' clock)")
    p.add_argument("--clock", help="name of the time column's clock, e.g. 'age (years)' (default: from the column name)")
    writes(p)

    exp = sub.add_parser("export", help="export scans to NIfTI, results to tables").add_subparsers(dest="target", required=True, metavar="TARGET")
    p = command("nifti", "write a cohort's scans, or a result's predicted scans (mean, bands, spread), as NIfTI with "
                "each subject's affine", _export_nifti, exp)
    p.add_argument("cohort", metavar="COHORT.zarr|RESULT.zarr")
    p.add_argument("--variables", default="image", help="comma-separated image variables to export (default: image)")
    writes(p, "DIR")
    p = command("table", "write a result as CSV: subject,time,biomarker,mean,q2.5,...,q97.5 (scenario results: "
                "subject,arm,time,... plus effect_mean,effect_q05,...), time on the cohort's clock", _export_table, exp)
    p.add_argument("result", metavar="RESULT.zarr")
    writes(p, "OUT.csv")

    p = command("train", "fit the twin on a cohort: the scan twin when it has scans (forecasts scans and biomarkers), "
                "else the biomarker twin; an interrupted training resumes when run again with the same output", _train)
    p.add_argument("cohort", metavar="COHORT.zarr")
    p.add_argument("--config", metavar="CONFIG.json", help="settings as JSON (ScanConfig fields for a scan twin, "
                   "TwinConfig fields for a biomarker twin); options below override it")
    p.add_argument("--biomarkers-only", action="store_true", help="fit the biomarker twin even when the cohort has scans")
    p.add_argument("--iterations", type=_positive_int, help="optimiser steps (default 600)")
    p.add_argument("--prior-steps", type=_count, help="then steps of the prior's marginal fit (default 300; 0: none)")
    p.add_argument("--hidden", type=int, help="width of the learned bend of the disease course (default 0: closed form)")
    p.add_argument("--seed", type=int, help="random seed of initialisation and sampling (default 0)")
    p.add_argument("--calibration-fraction", type=float,
                   help="subjects held out of the fit to calibrate the bands (default 0.2; 0: in-sample)")
    p.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                   help="leave this fraction of subjects out of training altogether (seeded by --seed), for "
                        "`twin evaluate` to score on (default 0)")
    writes(p, "MODEL_DIR")

    def asks(p: argparse.ArgumentParser, kind: str) -> None:
        p.add_argument("model", metavar="MODEL_DIR")
        p.add_argument("cohort", metavar="COHORT.zarr")
        if kind == "scenario":
            p.add_argument("scenario", metavar="SCENARIO.yaml", help="arms in the twin-scenarios/1 format (YAML or TOML)")
        at_help = "subject,time rows, times on the cohort's own clock (as imported: age, or years since baseline)"
        if kind == "fill":
            p.add_argument("--at", metavar="REQUESTS.csv", help=at_help + "; default: each subject's missed planned visits")
        else:
            when = p.add_mutually_exclusive_group(required=kind == "forecast")
            when.add_argument("--times", metavar="1,2,3", help="years after each subject's last observed visit, the same "
                              "for every subject" + (" (default 0.5,1,1.5,2,2.5,3)" if kind == "scenario" else ""))
            when.add_argument("--at", metavar="REQUESTS.csv", help=at_help)
        p.add_argument("--subjects", metavar="ID,ID", help="only these subjects (comma-separated; default: all, or those in --at)")
        p.add_argument("--n-samples", type=_positive_int, help="draws per answer (default: the model's; 200 for a biomarker twin, 16 scans for a scan twin)")
        p.add_argument("--samples", action="store_true", help="keep the draws in the result (variable samples)")
        p.add_argument("--seed", type=int, help="seed of the draws (default: the model's); recorded in the result")
        writes(p, "RESULT.zarr")

    p = command("forecast", "forecast biomarkers with calibrated bands and plausibility flags, given each subject's "
                "observed visits", lambda a: _ask(a, "forecast"))
    asks(p, "forecast")
    p = command("fill", "fill missed visits (default: each subject's planned visits that did not take place)",
                lambda a: _ask(a, "fill"))
    asks(p, "fill")
    p = command("scenario", "replay each subject under the arms of a scenario file and under its own schedule "
                "(arm factual); effects are arm - factual on paired draws", lambda a: _ask(a, "scenario"))
    asks(p, "scenario")

    p = command("evaluate", "score a trained twin on held-out visits of a cohort's held-out subjects, against "
                "copy-last, linear and mixed-effects baselines: metrics.json, figures and report.html", _evaluate)
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("cohort", metavar="COHORT.zarr")
    p.add_argument("--split", choices=["test", "all"], default="test",
                   help="test: the subjects the model was not trained on (default); all: every subject (in-sample)")
    p.add_argument("--n-samples", type=_positive_int, help="draws per answer (default: the model's)")
    p.add_argument("--seed", type=int, help="seed of the draws and the corruptions (default: the model's)")
    writes(p, "EVAL_DIR")

    p = command("validate", "check a cohort store against every rule of the format (exit 0 valid, 2 not)", _validate)
    p.add_argument("cohort", metavar="COHORT.zarr")
    p = command("info", "summarise a cohort store", _info)
    p.add_argument("cohort", metavar="COHORT.zarr")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("demo", "the main job, end to end on simulated patients; writes a report", _demo)
    p.add_argument("-o", "--output", default="twin-demo", metavar="DIR", help="output folder (default ./twin-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def _int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value: 'x'"
    return parse


_positive_int, _count = _int_at_least(1), _int_at_least(0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"twin {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("twin: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
