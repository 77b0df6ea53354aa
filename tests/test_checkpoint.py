"""Checkpoints: safetensors + JSON only, round trips, atomic writes, damage detected, exact resume."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
import xarray as xr

from twin import BiomarkerTwin, InputError, TwinConfig
from twin.checkpoint import (CONFIG, TENSORS, flatten_optimiser, read_checkpoint, unflatten_optimiser,
                             write_checkpoint)
from twin.data import import_table

LEASPY = os.path.join(os.path.dirname(__file__), "data", "leaspy", "alzheimer.csv")
# 60 joint steps, then 40 of the prior's marginal fit (steps 61-100)
CONFIG_FAST = TwinConfig(iterations=60, prior_steps=40, prior_draws=16, n_samples=32, calibration_fraction=0.2)


@pytest.fixture(scope="module")
def ds():
    return import_table(LEASPY).isel(subject=slice(0, 30))


@pytest.fixture(scope="module")
def fitted(ds, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    return BiomarkerTwin.fit(ds, CONFIG_FAST, checkpoint_dir=path, progress=False), path


def test_round_trip_gives_identical_forecasts_and_no_pickle(fitted, ds):
    twin, path = fitted
    assert sorted(os.listdir(path)) == [CONFIG, TENSORS]
    raw = (path / TENSORS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: a little-endian header length, then a JSON header
    header = json.loads(raw[8:8 + n])
    assert all(k.startswith("model.") for k in header if k != "__metadata__")  # no training state in a final model
    config = json.loads((path / CONFIG).read_text())
    assert config["complete"] and config["config"] == CONFIG_FAST.to_dict() and config["seed"] == 0
    back = BiomarkerTwin.load(path)
    assert back.fingerprint == twin.fingerprint
    xr.testing.assert_identical(back.forecast(ds, horizons=[0.5, 2], samples=True),
                                twin.forecast(ds, horizons=[0.5, 2], samples=True))


class Stop(Exception):
    """Raised from a fit's on_step: an interruption."""


def stop_at(n: int):
    """An on_step that interrupts the fit after step n."""

    def on_step(step, loss):
        if step == n:
            raise Stop
    return on_step


@pytest.mark.parametrize("stop, saved", [
    (37, 30),  # in the joint fit (its spreads update at 50, after the resume)
    (63, 60),  # at the end of the joint fit: the prior's fit starts afresh
    (93, 90),  # in the prior's fit, off its redraws (before steps 61 and 86), after its averaging began (81)
])
def test_resume_after_interruption_equals_an_uninterrupted_fit(ds, fitted, tmp_path, stop, saved):
    path = tmp_path / "m"
    with pytest.raises(Stop):
        BiomarkerTwin.fit(ds, CONFIG_FAST, checkpoint_dir=path, checkpoint_every=10, on_step=stop_at(stop), progress=False)
    tensors, meta = read_checkpoint(path)
    assert meta["step"] == saved and not meta["complete"] and "train.eta" in tensors and "adam.0.exp_avg" in tensors
    assert ("train.points" in tensors) == (saved > 60)
    with pytest.raises(InputError, match=f"unfinished training .step {saved} of 100.; run the training again"):
        BiomarkerTwin.load(path)
    steps = []
    resumed = BiomarkerTwin.fit(ds, CONFIG_FAST, checkpoint_dir=path, checkpoint_every=10,
                                on_step=lambda s, _: steps.append(s), progress=False)
    assert steps[0] == saved + 1 and steps[-1] == 100  # continued, not restarted
    straight, _ = fitted
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    assert resumed.calibration == straight.calibration
    # the finished model is loaded, not refitted; another config there is refused without overwrite
    again = BiomarkerTwin.fit(ds, CONFIG_FAST, checkpoint_dir=path, on_step=lambda s, _: steps.append(-s), progress=False)
    assert min(steps) > 0 and again.fingerprint == resumed.fingerprint
    with pytest.raises(InputError, match="holds a model of another cohort or config"):
        BiomarkerTwin.fit(ds, TwinConfig(iterations=5), checkpoint_dir=path, progress=False)


def test_a_partial_fit_of_the_older_format_is_not_resumed_and_a_finished_one_loads(ds, tmp_path):
    # /3 and /4 changed the fit (sigma left the optimiser; the prior's marginal fit followed the
    # joint one), so an older partial fit cannot be continued
    def as_older(path):
        meta = json.loads((path / CONFIG).read_text())
        config = {k: v for k, v in meta["config"].items() if k not in ("prior_steps", "prior_draws")}
        (path / CONFIG).write_text(json.dumps({**meta, "format": "twin-biomarker-model/3", "config": config}))

    partial, finished = tmp_path / "partial", tmp_path / "finished"
    with pytest.raises(Stop):
        BiomarkerTwin.fit(ds, CONFIG_FAST, checkpoint_dir=partial, checkpoint_every=10, on_step=stop_at(17),
                          progress=False)
    as_older(partial)
    with pytest.raises(InputError, match="a partial fit of an older format"):
        BiomarkerTwin.fit(ds, CONFIG_FAST, checkpoint_dir=partial, progress=False)
    BiomarkerTwin.fit(ds, CONFIG_FAST, checkpoint_dir=finished, progress=False)
    as_older(finished)
    older = BiomarkerTwin.load(finished)
    assert older.model.B == ds.sizes["biomarker"] and older.config.prior_steps == 0  # it had no such fit


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m"
    write_checkpoint(path, {"model.w": torch.arange(3.0)}, {"format": "x", "step": 1})
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, {"model.w": torch.zeros(3)}, {"format": "x", "step": 2})
    monkeypatch.undo()
    tensors, meta = read_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(tensors["model.w"], torch.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no partial left behind
    # a kill between the two renames of a swap leaves the old checkpoint aside: reading restores it
    os.rename(path, tmp_path / ".m.old-999")
    assert read_checkpoint(path)[1]["step"] == 1 and sorted(os.listdir(tmp_path)) == ["m"]


def test_damage_and_foreign_directories_are_input_errors(tmp_path):
    path = tmp_path / "m"
    with pytest.raises(InputError, match=r"m: no twin model here: expected config.json and model.safetensors"):
        read_checkpoint(path)
    write_checkpoint(path, {"model.w": torch.arange(3.0)}, {"step": 1})
    blob = bytearray((path / TENSORS).read_bytes())
    blob[-1] ^= 1
    (path / TENSORS).write_bytes(bytes(blob))
    with pytest.raises(InputError, match="model.safetensors: does not match config.json"):
        read_checkpoint(path)
    (path / CONFIG).write_text("{not json")
    with pytest.raises(InputError, match="config.json: not readable JSON"):
        read_checkpoint(path)
    with pytest.raises(InputError, match="config.json: not readable JSON"):
        BiomarkerTwin.load(path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"not a twin model directory \(it holds \['notes.txt'\]\)"):
        write_checkpoint(mine, {"model.w": torch.zeros(1)}, {})
    assert (mine / "notes.txt").read_text() == "keep me"


def test_optimiser_state_round_trips_through_tensors_and_json():
    w = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(0)))
    e = torch.zeros(0, requires_grad=True)  # an empty parameter (a model with no drugs has some)
    opt = torch.optim.Adam([{"params": [w]}, {"params": [e]}], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (w.square().sum() + e.sum()).backward()
        opt.step()
    tensors, groups = flatten_optimiser(opt.state_dict())
    groups = json.loads(json.dumps(groups))
    fresh = torch.optim.Adam([{"params": [w]}, {"params": [e]}], lr=0.1)
    fresh.load_state_dict(unflatten_optimiser(tensors, groups))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])
    assert np.isfinite(tensors["adam.0.exp_avg"].numpy()).all()
