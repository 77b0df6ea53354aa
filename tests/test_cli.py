"""The `twin` command: exit codes, one-line errors, and the subcommands on small inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from twin.cli import build_parser, main
from twin.data import write_cohort


def test_every_subcommand_has_help(capsys):
    for argv in (["simulate"], ["import", "bids"], ["import", "table"], ["export", "nifti"], ["validate"],
                 ["info"], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*argv, "--help"])
        assert exit_.value.code == 0
        assert "usage: twin" in capsys.readouterr().out


def test_validate_and_info(tmp_path, small, capsys):
    store = write_cohort(small, tmp_path / "c.zarr")
    assert main(["validate", str(store)]) == 0
    assert "valid (3 subjects)" in capsys.readouterr().out
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "subjects      3" in out and "volume [mL]" in out and "dmt x2" in out
    assert main(["info", "--json", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["visits"] == 10


def test_invalid_store_exits_2_with_reasons(tmp_path, small, capsys):
    store = write_cohort(small, tmp_path / "c.zarr")
    import zarr

    zarr.open_array(str(store / "time"), mode="r+")[0, 1] = 0.0  # damage it behind Twin's back
    assert main(["validate", str(store)]) == 2
    err = capsys.readouterr().err
    assert "c.zarr" in err and "duplicate visit times" in err and "Traceback" not in err


def test_missing_store_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.zarr: no cohort store" in err


def test_console_script_runs_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "twin.cli", "validate", str(tmp_path / "x.zarr")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "x.zarr" in proc.stderr
