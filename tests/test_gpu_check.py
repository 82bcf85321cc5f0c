"""The GPU check's short CPU form runs, so that the script the GPU machine runs cannot rot."""

import re
import runpy
import sys

from conftest import ROOT


def test_the_gpu_check_runs_on_cpu(monkeypatch, capsys):
    """The script as ``python benchmarks/gpu_check.py --accelerator cpu --quick`` runs it (here, in this
    process; its fits are fresh processes of their own)."""
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    monkeypatch.setattr(sys, "argv", [script, "--accelerator", "cpu", "--quick"])
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks"), *sys.path])
    runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    for config in ("names.yaml",):
        row = re.search(rf"^\| {config} \| 32-true \| 12 \| 0 \| ([\d.]+) \|.*final: step 12 ", out, flags=re.MULTILINE)
        assert row and float(row.group(1)) > 0, out
        assert re.search(rf"^\| {config} \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", out, flags=re.MULTILINE)
