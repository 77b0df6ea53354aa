"""`twin train | forecast | fill | scenario | export table` end to end on a tiny table cohort, and
one-line errors with exit status 2 on bad input."""

from __future__ import annotations

import csv
import os

import pytest

from twin.cli import build_parser, main

LEASPY = os.path.join(os.path.dirname(__file__), "data", "leaspy", "alzheimer.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 25-subject leaspy cohort imported from CSV and a model trained on it by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    lines = open(LEASPY).read().splitlines()
    subjects = sorted({line.split(",")[0] for line in lines[1:]})[:25]
    (root / "visits.csv").write_text("\n".join([lines[0], *(l for l in lines[1:] if l.split(",")[0] in subjects)]) + "\n")
    assert main(["import", "table", str(root / "visits.csv"), "-o", str(root / "c.zarr"), "-q"]) == 0
    assert main(["train", str(root / "c.zarr"), "-o", str(root / "m"), "--iterations", "40", "--prior-steps", "10", "-q"]) == 0
    return root


def test_help_of_the_new_commands(capsys):
    for argv in (["train"], ["forecast"], ["fill"], ["scenario"], ["export", "table"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*argv, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "usage: twin" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["forecast", "--help"])
    assert "years after each subject's last observed visit" in capsys.readouterr().out


def test_train_forecast_export_end_to_end(trained, capsys):
    r = trained
    assert sorted(os.listdir(r / "m")) == ["config.json", "model.safetensors"]
    assert main(["forecast", str(r / "m"), str(r / "c.zarr"), "--times", "1,2", "--subjects", "GS-001,GS-002",
                 "-o", str(r / "f.zarr")]) == 0
    assert main(["export", "table", str(r / "f.zarr"), "-o", str(r / "f.csv")]) == 0
    rows = list(csv.reader(open(r / "f.csv")))
    assert rows[0] == ["subject", "time", "biomarker", "mean", "q2.5", "q05", "q10", "q25", "q50", "q75", "q90", "q95", "q97.5"]
    assert len(rows) == 1 + 2 * 2 * 7 and {row[0] for row in rows[1:]} == {"GS-001", "GS-002"}
    for row in rows[1:]:
        q = [float(v) for v in row[4:]]
        assert q == sorted(q)
    # --at: absolute times on the cohort's clock (age), which come back as they were asked
    first = [l.split(",") for l in open(r / "visits.csv").read().splitlines()[1:] if l.startswith("GS-003,")]
    asked = [float(first[0][1]) + 0.25, float(first[-1][1]) + 1.5]
    (r / "req.csv").write_text("subject,time\n" + "".join(f"GS-003,{t!r}\n" for t in asked))
    assert main(["forecast", str(r / "m"), str(r / "c.zarr"), "--at", str(r / "req.csv"), "-o", str(r / "a.zarr")]) == 0
    assert main(["export", "table", str(r / "a.zarr"), "-o", str(r / "a.csv")]) == 0
    rows = list(csv.reader(open(r / "a.csv")))[1:]
    assert sorted({float(row[1]) for row in rows}) == asked and {row[0] for row in rows} == {"GS-003"}
    assert "wrote" in capsys.readouterr().out


def test_fill_and_scenario(trained, tmp_path, capsys):
    r = trained
    (tmp_path / "req.csv").write_text("subject,time\nGS-001,80.0\n")
    assert main(["fill", str(r / "m"), str(r / "c.zarr"), "--at", str(tmp_path / "req.csv"), "-o", str(tmp_path / "f.zarr")]) == 0
    (tmp_path / "none.yaml").write_text("arms:\n  nothing:\n    items: []\n")
    assert main(["scenario", str(r / "m"), str(r / "c.zarr"), str(tmp_path / "none.yaml"), "--times", "1",
                 "--subjects", "GS-001", "-o", str(tmp_path / "s.zarr")]) == 0
    assert main(["export", "table", str(tmp_path / "s.zarr"), "-o", str(tmp_path / "s.csv")]) == 0
    rows = list(csv.reader(open(tmp_path / "s.csv")))
    assert rows[0][:2] == ["subject", "arm"] and {row[1] for row in rows[1:]} == {"factual", "nothing"}
    assert "arms factual, nothing" in capsys.readouterr().out


def _one_line_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    r = trained
    model, cohort, out = str(r / "m"), str(r / "c.zarr"), str(tmp_path / "x.zarr")
    _one_line_error(capsys, ["forecast", model, cohort, "--times", "1,two", "-o", out], "--times", "'1,two'")
    _one_line_error(capsys, ["forecast", model, cohort, "--times", "1", "--subjects", "nobody", "-o", out],
                    "unknown subject(s) ['nobody']")
    (tmp_path / "bad.csv").write_text("subject,when\nGS-001,80\n")
    _one_line_error(capsys, ["forecast", model, cohort, "--at", str(tmp_path / "bad.csv"), "-o", out],
                    "bad.csv: when: unknown column; expected exactly subject,time")
    (tmp_path / "nan.csv").write_text("subject,time\nGS-001,soon\n")
    _one_line_error(capsys, ["forecast", model, cohort, "--at", str(tmp_path / "nan.csv"), "-o", out],
                    "nan.csv: time: line 2: expected a number, got 'soon'")
    _one_line_error(capsys, ["forecast", str(tmp_path / "nomodel"), cohort, "--times", "1", "-o", out],
                    "nomodel: no twin model here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    (broken / "model.safetensors").write_bytes(b"")
    _one_line_error(capsys, ["fill", str(broken), cohort, "-o", out], "config.json: not readable JSON")
    (tmp_path / "dmt.yaml").write_text("arms:\n  start:\n    items:\n      - {kind: dose, agent: dmt, dose: 1, start: 0}\n")
    _one_line_error(capsys, ["scenario", model, cohort, str(tmp_path / "dmt.yaml"), "-o", out],
                    "arms.start: the model knows no effect of agent 'dmt'")
    (tmp_path / "typo.yaml").write_text("arms:\n  a:\n    itemz: []\n")
    _one_line_error(capsys, ["scenario", model, cohort, str(tmp_path / "typo.yaml"), "-o", out], "typo.yaml", "itemz")
    _one_line_error(capsys, ["export", "table", cohort, "-o", str(tmp_path / "x.csv")], "not a twin result")
    _one_line_error(capsys, ["train", cohort, "-o", model, "--iterations", "3", "-q"],
                    "holds a model of another cohort or config")
    assert not (tmp_path / "x.zarr").exists()
