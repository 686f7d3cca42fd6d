"""The committed results reproduce: ``fedsubspace report`` over each committed matrix writes its
committed report again, byte for byte (tables, comparisons, plots, index), from the committed runs."""

import shutil
import subprocess
from pathlib import Path

import pytest

from fedsubspace.cli import main

RESULTS = Path(__file__).resolve().parent.parent / "results"
MATRICES = sorted(path.parent.name for path in RESULTS.glob("*/report"))


def test_there_are_committed_reports():
    assert MATRICES, f"no committed report under {RESULTS}"


def committed_files(matrix: Path) -> list[Path]:
    """The matrix's files as committed: git's list where this is a checkout (a matrix still running
    beside them holds runs that are not committed yet), every file otherwise."""
    listed = subprocess.run(["git", "ls-files", "-z", "."], cwd=matrix, capture_output=True, check=False)
    if listed.returncode != 0 or not listed.stdout:
        return [path for path in matrix.rglob("*") if path.is_file()]
    return [matrix / name for name in listed.stdout.decode().split("\0") if name]


@pytest.mark.parametrize("name", MATRICES)
def test_report_reproduces_the_committed_report_byte_for_byte(tmp_path, monkeypatch, name):
    copy = tmp_path / "results" / name
    for source in committed_files(RESULTS / name):
        if "report" not in source.relative_to(RESULTS / name).parts:
            target = copy / source.relative_to(RESULTS / name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
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
