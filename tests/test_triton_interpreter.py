"""The ("triton", "cpu") pair: every triton-cpu case of the op test files, in a fresh process
started with TRITON_INTERPRET=1.

Triton decorates its own library (tl.zeros, tl.sum, ...) for the interpreter only if
TRITON_INTERPRET=1 is set when triton is first imported, and a normal test run imports it
earlier (torch._dynamo does). So in this process the triton-cpu cases skip, and the test below
runs them in two new ones, side by side (this process only waits, and CI machines have two
cores), failing if any case fails or if too few ran. Both finish in about 2 minutes on an idle 2-core
machine (8 minutes each before the searches' final (min, index) combine stopped using tl.reduce
with a Python combine, which the interpreter runs per element); the interpreter budget in
conftest.py bounds each case.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODE_VARIABLES, STARTED_INTERPRETED

HERE = Path(__file__).resolve().parent
# Two groups of about equal interpreter time, each run by its own process.
FILE_GROUPS = (["test_nearest_code.py", "test_quantize.py", "test_ema_stats.py", "test_triton.py", "test_reliability.py",
                "test_sample_code.py", "test_modules.py"],
               ["test_nearest_code_split.py", "test_nearest_codes.py", "test_reliability_matrix.py"])
# The triton-cpu cases that pass today, with the test extras installed (test_quantize.py's
# rotation-trick cases need vector-quantize-pytorch). Fewer means some were lost or skipped, up to
# the pair as a whole; raise this when cases are added.
MIN_PASSED = 366


def summary_counts(output: str) -> dict[str, int]:
    """{"passed": 12, "skipped": 3, ...} from the last line of `pytest -q`."""
    lines = output.strip().splitlines()
    last = lines[-1] if lines else ""
    return {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last)}


@pytest.mark.skipif(STARTED_INTERPRETED, reason="this process was started with TRITON_INTERPRET=1 and runs the "
                                                "triton-cpu cases itself")
def test_triton_cpu_cases_pass_in_a_fresh_interpreter_process(record_property):
    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name not in MODE_VARIABLES}
    env["TRITON_INTERPRET"] = "1"
    runs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton-cpu",
                              *(str(HERE / name) for name in files)],
                             cwd=HERE.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for files in FILE_GROUPS]
    passed = 0
    try:
        for run in runs:
            stdout, stderr = run.communicate(timeout=900)
            output = stdout[-8000:] + stderr[-4000:]
            counts = summary_counts(stdout)
            record_property("triton_cpu_summary", counts)
            assert run.returncode == 0, output
            assert not counts.get("failed") and not counts.get("error") and not counts.get("errors"), output
            passed += counts.get("passed", 0)
    finally:
        for run in runs:
            run.kill()
    assert passed >= MIN_PASSED, f"only {passed} triton-cpu cases ran"
