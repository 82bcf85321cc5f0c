"""The GPU check's short CPU form runs, so that the script the GPU machine runs cannot rot."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_on_cpu():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--accelerator", "cpu",
                             "--quick"], capture_output=True, text=True, timeout=240, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    for config in ("names.yaml",):
        row = re.search(rf"^\| {config} \| 32-true \| 12 \| 0 \| ([\d.]+) \|.*final: step 12 ", result.stdout,
                        flags=re.MULTILINE)
        assert row and float(row.group(1)) > 0, result.stdout
        assert re.search(rf"^\| {config} \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", result.stdout, flags=re.MULTILINE)
