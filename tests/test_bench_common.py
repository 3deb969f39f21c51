"""The benchmarks' plumbing: what they write, where, under which name, and how they refuse bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import regenerate_command, write_results
from core.errors import StudioError

ROOT = Path(__file__).resolve().parent.parent


def test_results_carry_their_command_and_footer_and_a_quick_run_never_replaces_a_full_one(tmp_path: Path):
    rows = [{"what": "a", "seconds": 1.5}, {"what": "b", "seconds": 2.0, "note": "x"}]
    full = write_results("thing", rows, {"date": "today"}, "python bench/x.py", tmp_path, footer="geomean 1.2×")
    quick = write_results("thing", rows[:1], {"date": "today"}, "python bench/x.py --quick", tmp_path, quick=True)
    assert (full.name, quick.name) == ("thing.md", "thing_quick.md")
    text = full.read_text()
    assert "Regenerate: `python bench/x.py`" in text and "- date: today" in text and text.endswith("geomean 1.2×\n")
    assert "| what | seconds | note |" in text and "| b | 2.0 | x |" in text
    assert (tmp_path / "thing.csv").read_text().splitlines() == ["what,seconds,note", "a,1.5,", "b,2.0,x"]
    with pytest.raises(StudioError, match="nothing was measured"):
        write_results("empty", [], {}, "python bench/x.py", tmp_path)
    assert not (tmp_path / "empty.md").exists()
    assert regenerate_command("bench_e2e.py", ["--models", "Vim-B", "--out", "a b"]) == \
        "python bench/bench_e2e.py --models Vim-B --out 'a b'"


@pytest.mark.parametrize(("argv", "message"), [
    (["bench/bench_app.py", "--repeats", "0"], "argument --repeats: must be a whole number ≥ 1, got 0"),
    (["bench/bench_quant.py", "--limit", "-5"], "argument --limit: must be a whole number ≥ 1, got -5"),
    (["bench/bench_quant.py", "--model-dir", "/nonexistent", "--limit", "5"], "does not exist"),
    (["bench/bench_gen.py", "--iterations", "0"], "argument --iterations: must be a whole number ≥ 1"),
    (["bench/bench_launch_host.py", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench/bench_e2e.py", "--smoke", "--batches", "1", "1"], "argument --batches: 1 is given twice"),
])
def test_bad_benchmark_arguments_are_one_line_and_write_nothing(argv: list[str], message: str, tmp_path: Path):
    done = subprocess.run([sys.executable, *argv, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    err = done.stderr.strip()
    assert done.returncode != 0 and message in err and "\n" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
