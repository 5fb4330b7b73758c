"""The README's first two ```bash blocks are what CI runs on a fresh clone (.ci/run): the first installs and runs
the main job only (no browser, no test dependencies), the second installs what the tests need and runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks() -> list[str]:
    """The two blocks as .ci/run reads them (its own extraction, run here)."""
    script = (ROOT / ".ci" / "run").read_text()
    extract = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    out = subprocess.run([sys.executable, "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def commands(block: str) -> list[str]:
    return [c.strip() for c in re.split(r"&&|;", block) if c.strip()]


def test_ci_runs_the_readmes_first_two_bash_blocks():
    readme = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks() == [b.strip().replace("\n", " ; ") for b in readme[:2]]


def test_the_first_block_installs_and_runs_the_main_job_only():
    first = commands(blocks()[0])
    assert not any("chromium" in c or "apt-get" in c for c in first)
    assert not any("[test]" in c or "pytest" in c for c in first)
    assert ".venv/bin/pip install -e ." in first and first[-1] == ".venv/bin/nld-trt demo"
    assert any("nvidia-pytriton==" in c for c in first)  # the tritonserver the demo runs


def test_the_second_block_installs_the_test_needs_then_runs_the_tests():
    second = commands(blocks()[1])
    install = next(c for c in second if c.startswith("apt-get install"))
    assert {"chromium", "chromium-driver", "-y"} <= set(install.split())
    assert second.index("apt-get update") < second.index(install)
    assert '.venv/bin/pip install -e ".[test,dynamo]"' in second and second[-1] == ".venv/bin/python -m pytest -q"
    # NVIDIA Dynamo: its extra first, then ai-dynamo itself without its unresolvable aisimulate dependency
    assert second.index('.venv/bin/pip install -e ".[test,dynamo]"') < second.index(
        ".venv/bin/pip install --no-deps ai-dynamo==1.6.1") < len(second) - 1
    test_extra = re.search(r"^test = \[(.*?)\]\n", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    assert re.search(r'"lm-eval\[api\]==\d+\.\d+\.\d+"', test_extra)  # lm-eval pinned in the test extra
    dynamo_extra = re.search(r"^dynamo = \[(.*?)\]\n", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    assert '"ai-dynamo-runtime==1.6.1"' in dynamo_extra and "ai-dynamo==" not in dynamo_extra
