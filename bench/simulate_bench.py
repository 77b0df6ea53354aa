"""How long simulating and storing 100 subjects x 6 visits takes, per simulator, in 2D and 3D.

    python bench/simulate_bench.py [--subjects 100] [--kinds atrophy,glioma] [--dims 2,3]

Times the whole `twin simulate` path (anatomy, disease physics for the three scenarios,
acquisition, validation, the zarr write) on this machine, single process; prints one row per
(kind, dims) and the machine it ran on. Glioma's default schedule has 9 visits; here it is
given 6 (every 0.3 years) so both simulators are timed at the issue's 6 planned visits.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--kinds", default="atrophy,glioma")
    parser.add_argument("--dims", default="2,3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch  # only to report the thread count the rest of Twin would use

    from twin.data import open_cohort, write_cohort
    from twin.data.anatomy import template
    from twin.data.simulate import simulate, simulators

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch threads {torch.get_num_threads()}")
    print(f"{'kind':8} {'dims':>4} {'subjects':>8} {'visits':>6} {'observed':>8} {'total s':>8} {'s/subject':>9} {'store MB':>8}")
    for dims in map(int, args.dims.split(",")):
        template(dims)  # loading MNI152 once is not per-subject work
        for kind in args.kinds.split(","):
            cfg = simulators()[kind].config()
            if kind == "glioma":
                cfg = replace(cfg, n_visits=6, visit_every=0.3)
            out = Path(tempfile.mkdtemp(prefix="twin-bench-")) / f"{kind}{dims}d.zarr"
            start = time.perf_counter()
            write_cohort(simulate(kind, args.subjects, dims, args.seed, config=cfg, progress=False), out)
            seconds = time.perf_counter() - start
            ds = open_cohort(out)
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
            print(f"{kind:8} {dims:>4} {args.subjects:>8} {ds.sizes['visit']:>6} {int(np.asarray(ds['observed']).sum()):>8} "
                  f"{seconds:>8.1f} {seconds / args.subjects:>9.3f} {size:>8.1f}", flush=True)
            shutil.rmtree(out.parent)


if __name__ == "__main__":
    main()
