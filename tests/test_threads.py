"""Threads chosen from the work and the cores allowed (``microgpt.threads``): the user's setting wins, a bad one
is one line, idle OpenMP threads spin briefly, and the seed recipe is exact whatever the thread count."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.seed_reference import train_seed
from test_fidelity import fit_seed_recipe

from microgpt.commands.cli import main
from microgpt.threads import GRAIN_SIZE, SPIN_COUNT, Start, allowed_cores, choose

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CORES = allowed_cores()


def fresh(args, **env):
    """``python -m microgpt ARGS`` in a fresh process with ``env`` over this one's, OMP_NUM_THREADS unset unless given."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-m", "microgpt", *args], check=False, capture_output=True, text=True,
                          timeout=120, env={**base, "PYTHONPATH": str(ROOT), **env})


def test_threads_follow_the_largest_tensor_and_the_idle_cores():
    nothing_set, idle = Start(omp_num_threads=None, torch_threads=8), lambda: 0.0
    # torch splits a pointwise operation between threads only from GRAIN_SIZE values
    assert choose(GRAIN_SIZE - 1, 8, start=nothing_set, busy=idle)[0] == 1
    assert choose(GRAIN_SIZE, 8, start=nothing_set, busy=idle)[0] == 8
    # the cores that other work leaves idle at the start, rounded
    assert choose(GRAIN_SIZE, 8, start=nothing_set, busy=lambda: 2.6)[0] == 5
    assert choose(GRAIN_SIZE, 2, start=Start(None, 2), busy=lambda: 1.0)[0] == 1
    assert choose(GRAIN_SIZE, 2, start=Start(None, 2), busy=lambda: 2.0)[0] == 1
    assert choose(GRAIN_SIZE, 8, start=nothing_set, busy=lambda: None)[0] == 8
    # several processes of one run share the cores (and keep each other busy: nothing is watched)
    assert choose(10 * GRAIN_SIZE, 8, processes=2, start=nothing_set, busy=lambda: 6.0)[0] == 4
    assert choose(10 * GRAIN_SIZE, 8, processes=16, start=nothing_set, busy=idle)[0] == 1
    # the user's choice wins: OMP_NUM_THREADS, or torch.set_num_threads before the run (leave it as it is)
    assert choose(10 * GRAIN_SIZE, 8, start=Start(3, 3), busy=lambda: 8.0) == (3, "OMP_NUM_THREADS")
    assert choose(1, 8, start=Start(omp_num_threads=None, torch_threads=5), busy=idle)[0] is None


@pytest.mark.skipif(not Path("/proc/stat").exists() or not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_core_kept_busy_by_another_process_counts_as_busy():
    """One core, kept busy by a CPU-bound process pinned to it: whatever else runs there, it is never idle."""
    cpu = min(os.sched_getaffinity(0))
    pin = f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
    spinner = subprocess.Popen([sys.executable, "-c", pin + "\nwhile True: pass"])
    try:
        time.sleep(0.3)
        measured = subprocess.run([sys.executable, "-c", pin + "from microgpt.threads import busy_cores; "
                                   "print(busy_cores(0.3))"], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    finally:
        spinner.kill()
        spinner.wait()
    assert float(measured.stdout) > 0.9


@pytest.mark.parametrize("value", ["0", "-1", "two", str(CORES + 1)])
def test_a_thread_count_that_cannot_be_honoured_is_one_line(value):
    for command in (["fit", "--config", str(CONFIGS / "names.yaml")], ["sample", "--ckpt_path", "last"]):
        result = fresh(command, OMP_NUM_THREADS=value)
        assert result.returncode == 2
        assert result.stderr.strip() == (f"microgpt: error: OMP_NUM_THREADS={value}: the number of threads must be a "
                                         f"whole number from 1 to {CORES}, the cores this process may use.")


def test_a_bad_thread_count_in_process_is_one_line(tiny_names, tmp_path, monkeypatch, capsys):
    from conftest import error_line

    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    line = error_line(["fit", "--config", str(CONFIGS / "names.yaml"), "--data.path", str(tiny_names),
                       "--data.val_size", "4", "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert line.startswith("microgpt: error: OMP_NUM_THREADS=0: ")


def test_openmp_threads_spin_briefly_unless_the_user_set_openmp():
    """OpenMP itself reports its spin count (libgomp's OMP_DISPLAY_ENV): microgpt's when it chose, OpenMP's own
    default when the user set OMP_NUM_THREADS."""
    chosen = fresh(["sample", "--help"], OMP_DISPLAY_ENV="verbose")
    if "GOMP_SPINCOUNT" not in chosen.stderr:
        pytest.skip("torch's OpenMP here is not libgomp")
    assert f"GOMP_SPINCOUNT = '{SPIN_COUNT}'" in chosen.stderr
    users = fresh(["sample", "--help"], OMP_DISPLAY_ENV="verbose", OMP_NUM_THREADS="1")
    assert "GOMP_SPINCOUNT = '300000'" in users.stderr


@pytest.fixture
def nothing_set(monkeypatch):
    """This process as if the user had set no threads (the suite sets one thread for itself), on an idle machine."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("microgpt.threads.busy_cores", lambda: 0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(CORES)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("recipe,threads,values", [("names.yaml", 1, 1 * 8 * 64),  # batch 1, context 8, MLP 4 * 16
                                                   ("names-batched.yaml", CORES, 32 * 16 * 256)])
def test_fit_chooses_and_logs_threads(recipe, threads, values, nothing_set, tiny_names, tmp_path, caplog):
    main(["fit", "--config", str(CONFIGS / recipe), "--data.path", str(tiny_names), "--data.val_size", "4",
          "--data.test_size", "0", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
          "--trainer.callbacks", "[]", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    assert torch.get_num_threads() == threads
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("threads: ")]
    assert len(lines) == 1 and lines[0].startswith(f"threads: {threads} (a step's largest tensor has {values:,} values")


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
def test_seed_recipe_matches_the_plain_loop_on_two_threads(names_file, tmp_path, monkeypatch):
    """The fidelity test's promise on two threads: both sides on 2 threads, where MKL rounds the 5- and 6-row
    matrix products differently from one thread (by up to about 3e-5 in the loss by step 500)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    try:
        ref_losses, _, _ = train_seed(names_file, num_samples=0)
        _, losses = fit_seed_recipe(names_file, tmp_path, "--trainer.callbacks", "[]", "--trainer.logger", "false")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert len(losses) == 500 and losses == pytest.approx(ref_losses, abs=1e-5)
