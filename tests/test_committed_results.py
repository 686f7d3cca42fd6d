"""The committed results reproduce: ``fedsubspace report`` over each committed matrix writes its
committed report again, byte for byte (tables, comparisons, plots, index), from the committed runs."""

import shutil
from pathlib import Path

import pytest

from fedsubspace.cli import main

RESULTS = Path(__file__).resolve().parent.parent / "results"
MATRICES = sorted(path.parent.name for path in RESULTS.glob("*/report"))


def test_there_are_committed_reports():
    assert MATRICES, f"no committed report under {RESULTS}"


@pytest.mark.parametrize("name", MATRICES)
def test_report_reproduces_the_committed_report_byte_for_byte(tmp_path, monkeypatch, name):
    copy = tmp_path / "results" / name
    shutil.copytree(RESULTS / name, copy, ignore=shutil.ignore_patterns("report"))
    monkeypatch.chdir(tmp_path)  # the report names the matrix as given: results/NAME, as committed
    assert main(["report", f"results/{name}"]) == 0
    committed = sorted(p.name for p in (RESULTS / name / "report").iterdir())
    assert sorted(p.name for p in (copy / "report").iterdir()) == committed
    different = [
        f
        for f in committed
        if (copy / "report" / f).read_bytes() != (RESULTS / name / "report" / f).read_bytes()
    ]
    assert not different, f"{name}: these report files differ from the committed ones: {different}"
