"""The OpenAI benchmark scripts run end to end, short: NVIDIA's aiperf against a deployment the script starts
itself, and the front-end-vs-gRPC overhead script. The figures are theirs to print, not the tests' to check;
the tests check that every request succeeded and that the tables came out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from openai_stack import require_stack

require_stack()

ROOT = Path(__file__).resolve().parent.parent
AIPERF = Path(sys.executable).parent / "aiperf"


@pytest.mark.skipif(not AIPERF.is_file(), reason="no aiperf next to this Python: install the test extra")
def test_bench_openai_runs_aiperf_and_prints_its_table():
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "bench_openai.sh"), "--modes", "linear_spec",
                          "--concurrency", "2", "--requests", "4", "--max-tokens", "16"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("linear_spec")]
    assert len(rows) == 1, out.stdout
    mode, conc, requests, errors, req_s = (c.strip() for c in rows[0][:5])
    assert (conc, requests, errors) == ("2", "4", "0") and float(req_s) > 0


def test_bench_openai_overhead_prints_both_paths():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_openai_overhead.py"), "--modes", "dlm",
                          "--concurrency", "1,2", "--prompts", "2", "--requests", "2", "--rounds", "1",
                          "--max-tokens", "16", "--slots", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| dlm")]
    assert [r[1].strip() for r in rows] == ["1", "2"], out.stdout
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0 and r[11].strip() == "2/2"  # both paths answered, same text
