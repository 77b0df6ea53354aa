"""Checkpoints: a model directory of safetensors and JSON, written atomically; no pickle anywhere.

    MODEL_DIR/
        model.safetensors   every tensor, by name ("model.c", "train.eta", "adam.3.exp_avg", ...)
        config.json         everything else, plain JSON, including the sha256 of model.safetensors

A checkpoint is written whole into a hidden sibling (`.NAME.partial-PID`) that replaces
MODEL_DIR by renames: the old directory is renamed aside, the new one in, the old deleted. At
every instant MODEL_DIR is the old checkpoint or the new one, never a mix of their two files;
`read_checkpoint` finishes a swap a crash interrupted. Because the swap replaces the whole
directory, a MODEL_DIR holding anything but these two files is refused rather than replaced.

Adam's state (a dict of tensors and hyper-parameters) is flattened to tensors plus JSON by
`flatten_optimiser` and rebuilt by `unflatten_optimiser`, so training resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from twin.errors import InputError

TENSORS, CONFIG = "model.safetensors", "config.json"
_OURS = {TENSORS, CONFIG}


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], config: dict) -> Path:
    """Write `tensors` and the JSON-able `config` to the model directory `path`, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    _finish_interrupted_swap(path)
    if path.exists():
        other = sorted(p.name for p in path.iterdir() if p.name not in _OURS) if path.is_dir() else [path.name]
        if other:
            raise InputError(f"not a twin model directory (it holds {other[:3]}); choose an empty or new directory",
                             source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        # safetensors wants contiguous tensors that do not share memory
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(partial / TENSORS))
        body = dict(config, tensors_sha256=_sha256(partial / TENSORS))
        (partial / CONFIG).write_text(json.dumps(body, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        _swap_into_place(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(tensors, config) of a model directory; a missing, partial or altered one is an InputError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _finish_interrupted_swap(path)
    if not (path / CONFIG).is_file() or not (path / TENSORS).is_file():
        raise InputError(f"no twin model here: expected {CONFIG} and {TENSORS}", source=str(path))
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"not readable JSON ({err})", source=str(path / CONFIG)) from None
    if not isinstance(config, dict) or "tensors_sha256" not in config:
        raise InputError("not a twin model config (no tensors_sha256)", source=str(path / CONFIG))
    if _sha256(path / TENSORS) != config.pop("tensors_sha256"):
        raise InputError(f"does not match {CONFIG} (altered or from another checkpoint)", source=str(path / TENSORS))
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError) as err:
        raise InputError(f"not a readable safetensors file ({err})", source=str(path / TENSORS)) from None
    return tensors, config


def has_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    _finish_interrupted_swap(path)
    return (path / CONFIG).is_file()


def flatten_optimiser(state: dict) -> tuple[dict[str, Tensor], list[dict]]:
    """An optimiser's state_dict as (tensors "adam.<param>.<key>", JSON-able param groups)."""
    tensors = {f"adam.{i}.{key}": torch.as_tensor(value) for i, entry in state["state"].items()
               for key, value in entry.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def unflatten_optimiser(tensors: dict[str, Tensor], groups: list[dict]) -> dict:
    """Inverse of `flatten_optimiser`: a state_dict for `optimiser.load_state_dict`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    return {"state": state, "param_groups": [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swap_into_place(partial: Path, path: Path) -> None:
    if not path.exists():
        os.rename(partial, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(partial, path)  # from here the new checkpoint is in place
    shutil.rmtree(old, ignore_errors=True)


def _finish_interrupted_swap(path: Path) -> None:
    """A kill between the two renames of a swap leaves only the old directory aside: restore it."""
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if path.exists():
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)
    elif olds:
        os.rename(olds[-1], path)
