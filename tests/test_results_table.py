
"""The README's results table reproduces: its cheap rows are fitted and tested afresh by the script that writes
the table (``benchmarks/results.py``), and every figure must match (wall times excepted, which depend on the
machine). The costly rows (names-fast, names-best and the two-model average) are re-run by the same script,
by hand: ``python benchmarks/results.py --rows names-fast names-best names-best-adamw ensemble --check``."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several fresh fits or processes: `-m "not slow"` leaves them out

ROOT = Path(__file__).resolve().parents[1]


def test_the_seed_and_names_batched_rows_reproduce():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results.py"), "--rows", "names",
                             "names-batched", "--check"], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "every re-run figure matches the README's table" in result.stdout
