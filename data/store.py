"""The cohort store: zarr v3 on disk, opened lazily, written so a crash never leaves damage.

Writes go to a hidden sibling (`.NAME.partial-PID`) that becomes the store by one rename
only once complete; replacing a store first renames the old one aside (`.NAME.old-PID`)
and deletes it only after the new one is in place. `open_cohort` finishes an interrupted
swap, so at every instant either the old or the new store is at the path, never a mix.
Appending subjects is copy-on-write through the same path: the existing store is read
lazily and rewritten beside itself, so a failed append leaves it exactly as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xarray as xr

from twin.errors import InputError

from .schema import SCENARIO, SUBJECT, VISIT
from .validate import validate

# Scans are chunked one visit at a time (what a model reads) and sharded one subject per
# file, so a 100-subject cohort is hundreds of files, not tens of thousands.
_PER_VISIT = {"image", "truth_image", "truth_labels"}
_BLOCK = 256  # subjects per chunk for the small per-subject arrays


def open_cohort(path: str | os.PathLike, *, check: bool = True) -> xr.Dataset:
    """Open a cohort store lazily (dask-backed); validate it unless `check=False`."""
    path = Path(path)
    _finish_interrupted_swap(path)
    if not path.exists():
        raise InputError("no cohort store at this path", source=str(path))
    try:
        ds = xr.open_zarr(path, consolidated=False, chunks={})
    except Exception as err:  # zarr raises a zoo of types for a damaged store
        raise InputError(f"not a readable zarr store ({type(err).__name__}: {err})", source=str(path)) from None
    ds = as_object_strings(ds)
    return validate(ds, source=str(path)) if check else ds


def as_object_strings(ds: xr.Dataset) -> xr.Dataset:
    """Strings as Python objects everywhere, as the cohort is built in memory.

    zarr reads strings back as numpy's StringDType (or fixed-width unicode); code that compares
    or converts them should meet one dtype, whether a cohort came from memory or from disk.
    """
    strings = [name for name, var in ds.variables.items() if var.dtype.kind in "UST"]
    coords = {n: (ds[n].dims, np.asarray(ds[n].values, dtype=object), ds[n].attrs) for n in strings if n in ds.coords}
    data = {n: ds[n].variable.astype(object) for n in strings if n in ds.data_vars}  # variables: no stale coords
    return ds.assign_coords(coords).assign(data)


def write_cohort(
    cohort: xr.Dataset | Iterable[xr.Dataset],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Validate and write a cohort, or an iterable of subject blocks, atomically to `path`.

    Blocks (a simulator's or importer's output, a few subjects at a time) must share every
    dimension except `subject`; they are appended to the partial store as they come, so a
    cohort larger than memory can be written. Returns the path.
    """
    path = Path(path)
    _finish_interrupted_swap(path)
    if path.exists() and not overwrite:
        raise InputError("already exists; choose another path or overwrite it", source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    blocks = [cohort] if isinstance(cohort, xr.Dataset) else cohort
    try:
        seen: set[str] = set()
        first = None
        for block in blocks:
            validate(block, source=str(path))
            ids = {str(s) for s in block[SUBJECT].values}
            if seen & ids:
                raise InputError(f"duplicate subject ids across blocks: {sorted(seen & ids)[:5]}", source=str(path))
            seen |= ids
            if first is None:
                first = block
                _to_zarr(block, partial, progress=progress)
            else:
                _check_same_layout(first, block, source=str(path))
                _to_zarr(block, partial, append=True, progress=progress)
        if first is None:
            raise InputError("nothing to write: no subjects", source=str(path))
        _swap_into_place(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


def append_subjects(path: str | os.PathLike, new: xr.Dataset, *, progress: bool = False) -> Path:
    """Add subjects to an existing store, copy-on-write; histories and events are re-padded."""
    path = Path(path)
    old = open_cohort(path)
    _check_compatible(old, new, source=str(path))
    clash = sorted(set(map(str, old[SUBJECT].values)) & set(map(str, new[SUBJECT].values)))
    if clash:
        raise InputError(f"subjects already in the store: {clash[:5]}", source=str(path))
    combined = concat_cohorts([old, new])
    return write_cohort(combined, path, overwrite=True, progress=progress)


def concat_cohorts(cohorts: list[xr.Dataset]) -> xr.Dataset:
    """Stack cohorts along `subject`, padding visits and events to the longest history."""
    # Small arrays are loaded (dask cannot concatenate object strings lazily); scans stay lazy.
    cohorts = [c.assign({n: c[n].load() for n in c.variables if n not in _PER_VISIT | {"mask"}}) for c in cohorts]
    fill = {}
    for c in cohorts:
        for name, var in c.data_vars.items():
            fill[name] = False if var.dtype == bool else "" if var.dtype.kind in "OUS" else 0 if var.dtype.kind in "iu" else np.nan
    out = xr.concat(cohorts, dim=SUBJECT, join="outer", fill_value=fill, data_vars="minimal",
                    coords="minimal", compat="override", combine_attrs="override")
    for name, var in out.data_vars.items():
        if var.dtype.kind in "OUS":  # strings stay variable-length objects
            out[name] = var.astype(object)
    return out


def _to_zarr(ds: xr.Dataset, path: Path, *, append: bool = False, progress: bool = False) -> None:
    ds = ds.copy()
    encoding = {}
    for name, var in ds.variables.items():
        var.encoding = {}
        if var.dtype == object or name in ds.dims:
            continue
        chunks = [min(n, _BLOCK) if d == SUBJECT else n for d, n in zip(var.dims, var.shape)]
        if name in _PER_VISIT:
            chunks = [1 if d in (SUBJECT, VISIT, SCENARIO) else n for d, n in zip(var.dims, var.shape)]
            shards = [1 if d in (SUBJECT, SCENARIO) else n for d, n in zip(var.dims, var.shape)]
            encoding[name] = {"chunks": tuple(chunks), "shards": tuple(shards)}
            if var.chunks is not None:  # each dask task must own whole shards
                ds[name] = var.chunk(dict(zip(var.dims, shards)))
        elif not append:
            encoding[name] = {"chunks": tuple(chunks)}
    kwargs = dict(zarr_format=3, consolidated=False)
    if append:
        encoding = {}  # an existing store keeps its encoding
        job = ds.to_zarr(path, mode="a", append_dim=SUBJECT, compute=False, **kwargs)
    else:
        job = ds.to_zarr(path, mode="w-", encoding=encoding, compute=False, **kwargs)
    _compute(job, progress=progress, what=f"writing {path.name.split('.partial')[0].lstrip('.')}")


def _compute(job, *, progress: bool, what: str) -> None:
    if not progress:
        job.compute()
        return
    from dask.callbacks import Callback
    from tqdm.auto import tqdm

    class _Bar(Callback):
        def _start_state(self, dsk, state):
            self.bar = tqdm(total=sum(len(state[k]) for k in ("ready", "waiting", "running")), desc=what, unit="task", leave=False)

        def _posttask(self, key, result, dsk, state, worker_id):
            self.bar.update(1)

        def _finish(self, dsk, state, errored):
            self.bar.close()

    with _Bar():
        job.compute()


def _check_same_layout(first: xr.Dataset, block: xr.Dataset, *, source: str) -> None:
    for dim, n in first.sizes.items():
        if dim != SUBJECT and block.sizes.get(dim) != n:
            raise InputError(f"block has {dim}={block.sizes.get(dim)}, first block had {n}", source=source)


def _check_compatible(old: xr.Dataset, new: xr.Dataset, *, source: str) -> None:
    """Appended subjects must carry the same kinds of data on the same grid and clock."""
    for coord in ("channel", "biomarker", "covariate"):
        a = list(map(str, old[coord].values)) if coord in old.coords else None
        b = list(map(str, new[coord].values)) if coord in new.coords else None
        if a != b:
            raise InputError(f"{coord}: store has {a}, new subjects have {b}", source=source)
    for dim in ("z", "y", "x"):
        if old.sizes.get(dim) != new.sizes.get(dim):
            raise InputError(f"image grid: store has {dim}={old.sizes.get(dim)}, new subjects have {new.sizes.get(dim)}", source=source)
    if old.attrs.get("clock") != new.attrs.get("clock"):
        raise InputError(f"clock: store uses {old.attrs.get('clock')!r}, new subjects {new.attrs.get('clock')!r}", source=source)
    if set(old.data_vars) != set(new.data_vars):
        raise InputError(f"variables differ: store has {sorted(old.data_vars)}, new subjects have {sorted(new.data_vars)}", source=source)


def _swap_into_place(partial: Path, path: Path) -> None:
    if not path.exists():
        os.rename(partial, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.rename(path, old)
    os.rename(partial, path)  # from here the new store is in place
    shutil.rmtree(old, ignore_errors=True)


def _finish_interrupted_swap(path: Path) -> None:
    """A kill between the two renames of a swap leaves only the old store aside: restore it."""
    if path.exists():
        for old in path.parent.glob(f".{path.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True)
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.rename(olds[-1], path)


def _remove_stale_partials(path: Path) -> None:
    """Partial stores left by killed writers (their process is gone) are garbage."""
    for partial in path.parent.glob(f".{path.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
