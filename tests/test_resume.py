"""Interrupted runs continue exactly; checkpoints are written atomically and read safely."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import error_line

from microgpt.checkpoints.io import atomic_torch_save
from microgpt.commands.cli import main

pytestmark = pytest.mark.slow  # several fresh fits or processes: `-m "not slow"` leaves them out

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")
STEPS = 150
EVERY = 10

CALLBACK_LIST = [
    {"class_path": "microgpt.callbacks.RunCheckpoint", "init_args": {"every_n_train_steps": EVERY}},
    {"class_path": "microgpt.callbacks.SampleNames", "init_args": {"num_samples": 10}},
]
CALLBACKS = json.dumps(CALLBACK_LIST)


def fit_command(names: Path, root: Path, *extra) -> list[str]:
    """``python -m microgpt fit`` with dropout on (so the random state matters) and a loss logged every step."""
    return [sys.executable, "-m", "microgpt", "fit", "--config", CONFIG, "--data.path", str(names),
            "--data.val_size", "4", "--data.batch_size", "2", "--model.dropout", "0.1",
            "--trainer.max_steps", str(STEPS), "--trainer.callbacks", CALLBACKS,
            "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(root),
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), *extra]


# One thread per run: tiny models on a few shared cores are several times slower with more.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, check=False)


def run_and_signal(cmd: list[str], version_dir: Path, signum: int) -> subprocess.CompletedProcess:
    """Start ``cmd``; as soon as it has written its first ``last.ckpt``, send it ``signum``; wait for it to end."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) as proc:
        deadline = time.monotonic() + 240
        while not (version_dir / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def losses(version_dir: Path) -> dict[int, str]:
    """The per-step training losses a CSVLogger wrote, exactly as written, by step."""
    with open(version_dir / "metrics.csv", newline="") as f:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(f) if row.get("train/loss")}


def samples(stdout: str) -> list[str]:
    return re.findall(r"^sample +\d+: (.*)$", stdout, flags=re.MULTILINE)


def assert_same_tensors(expected: dict, actual: dict, label: str = "state_dict") -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), (label, key)


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


NAMES = "anna\nbob\ncarla\ndave\neve\nfiona\ngreg\nhana\nivan\njulia\nkarl\nlena\nmona\nnils\nolga\npaul\nquinn\nrosa\n"


@pytest.fixture
def names(tmp_path) -> Path:
    path = tmp_path / "names.txt"
    path.write_text(NAMES)
    return path


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """The recipe with a moving average of the weights (``microgpt.callbacks.EMA``, a callback of microgpt's that
    saves checkpoints in the layout of Lightning's ``WeightAveraging``, as in ``names-best.yaml``), run twice at once: straight through, and SIGKILLed after a
    periodic checkpoint, then SIGTERMed, then stopped by Ctrl-C, each followed by ``--ckpt_path last``."""
    tmp = tmp_path_factory.mktemp("interrupted")
    names = tmp / "names.txt"
    names.write_text(NAMES)
    callbacks = ["--trainer.callbacks", json.dumps([*CALLBACK_LIST, {"class_path": "microgpt.callbacks.EMA",
                                                                      "init_args": {"decay": 0.9}}])]
    straight_run = subprocess.Popen(fit_command(names, tmp / "straight", *callbacks), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=ENV)  # alongside the interrupted one
    root = tmp / "interrupted"
    logs = root / "lightning_logs"
    killed = run_and_signal(fit_command(names, root, *callbacks), logs / "version_0", signal.SIGKILL)
    stopped = [run_and_signal(fit_command(names, root, *callbacks, "--ckpt_path", "last"),
                              logs / f"version_{version}", signum)
               for version, signum in [(1, signal.SIGTERM), (2, signal.SIGINT)]]
    resumed = run(fit_command(names, root, *callbacks, "--ckpt_path", "last"))
    stdout, stderr = straight_run.communicate(timeout=240)
    straight = subprocess.CompletedProcess(straight_run.args, straight_run.returncode, stdout, stderr)
    return {"straight": straight, "killed": killed, "stopped": stopped, "resumed": resumed, "logs": logs,
            "reference": tmp / "straight" / "lightning_logs" / "version_0"}


def test_killed_and_signalled_runs_resume_to_the_same_weights_losses_and_samples(interrupted):
    """SIGKILL after a periodic checkpoint, then SIGTERM, then Ctrl-C, each followed by ``--ckpt_path last``: the
    weights being trained, every step's loss and the samples are the straight run's."""
    logs = interrupted["logs"]
    assert interrupted["killed"].returncode == -signal.SIGKILL
    killed_at = ckpt_step(logs / "version_0" / "checkpoints" / "last.ckpt")
    assert 0 < killed_at < STEPS

    stopped_at = []
    for version, signum, stopped in [(1, signal.SIGTERM, interrupted["stopped"][0]),
                                     (2, signal.SIGINT, interrupted["stopped"][1])]:
        assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
        assert "Traceback" not in stopped.stderr
        last = logs / f"version_{version}" / "checkpoints" / "last.ckpt"
        found = re.fullmatch(rf"microgpt: stopped by {signum.name} at step (\d+); saved (.*); "
                             r"continue with: fit \.\.\. --ckpt_path last", stopped.stderr.strip().splitlines()[-1])
        assert found and found.group(2) == str(last), stopped.stderr[-3000:]
        step = int(found.group(1))
        assert ckpt_step(last) == step
        stopped_at.append(step)
    assert stopped_at[0] < stopped_at[1] < STEPS

    resumed, straight = interrupted["resumed"], interrupted["straight"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = torch.load(interrupted["reference"] / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(logs / "version_3" / "checkpoints" / "last.ckpt", weights_only=True)
    assert expected["global_step"] == actual["global_step"] == STEPS
    assert_same_tensors(expected["current_model_state"], actual["current_model_state"], "the trained weights")

    pieced = {}
    for version in range(4):  # later runs repeat the steps after the checkpoint they resumed from
        pieced.update(losses(logs / f"version_{version}"))
    reference_losses = losses(interrupted["reference"])
    assert pieced == {step: reference_losses[step] for step in pieced}
    # SIGKILL may lose the killed run's last unflushed log lines; every later step was logged
    assert set(range(killed_at, STEPS)) <= pieced.keys() and len(reference_losses) == STEPS

    assert samples(resumed.stdout) == samples(straight.stdout)
    assert len(samples(straight.stdout)) == 10


def test_a_run_with_weight_averaging_resumes_to_the_same_average_and_weights(interrupted):
    """The same runs: the stopped run continues both the trained weights and their average exactly."""
    expected = torch.load(interrupted["reference"] / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(interrupted["logs"] / "version_3" / "checkpoints" / "last.ckpt", weights_only=True)
    for part in ("state_dict", "current_model_state"):  # the average, and the weights being trained
        assert_same_tensors(expected[part], actual[part], part)
    average, current = expected["state_dict"], expected["current_model_state"]
    assert not all(torch.equal(average[key], current[key]) for key in average)


def test_a_muon_run_resumes_to_the_same_weights_optimizer_state_and_losses(names, tmp_path):
    """``MuonWithAdamW`` (Muon and AdamW stepped as one optimizer): resumed from its step-30
    checkpoint, a 60-step run ends with the uninterrupted run's weights, momentum buffers and Adam moments,
    and logs the same loss at every step."""
    every_30 = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"every_n_train_steps": 30, "save_top_k": -1, "filename": "{step}"}}])

    def fit(root: Path, *extra: str) -> Path:
        main(fit_command(names, root, "--model.optimizer", "microgpt.training.optimizers.MuonWithAdamW",
                         "--trainer.max_steps", "60",
                         "--trainer.callbacks", every_30, *extra)[3:])
        return root / "lightning_logs" / "version_0"

    straight = fit(tmp_path / "straight")
    resumed = fit(tmp_path / "resumed", "--ckpt_path", str(straight / "checkpoints" / "step=30.ckpt"))
    expected = torch.load(straight / "checkpoints" / "step=60.ckpt", weights_only=True)
    actual = torch.load(resumed / "checkpoints" / "step=60.ckpt", weights_only=True)
    assert expected["global_step"] == actual["global_step"] == 60
    assert_same_tensors(expected["state_dict"], actual["state_dict"])
    (expected_optimizer,), (actual_optimizer,) = expected["optimizer_states"], actual["optimizer_states"]
    assert [g.get("name") for g in actual_optimizer["param_groups"]] == ["muon", "adamw", "adamw-no_decay"]
    assert "momentum_buffer" in actual_optimizer["state"][0] and "exp_avg_sq" in actual_optimizer["state"][6]
    assert expected_optimizer["state"].keys() == actual_optimizer["state"].keys()
    for index, state in expected_optimizer["state"].items():
        assert_same_tensors(state, actual_optimizer["state"][index], f"optimizer state {index}")
    resumed_losses = losses(resumed)
    assert set(resumed_losses) == set(range(30, 60)) and resumed_losses.items() <= losses(straight).items()


def test_the_steps_after_the_last_periodic_checkpoint_are_saved(names, tmp_path):
    """``max_steps`` 7 with a checkpoint every 5 steps: ``last.ckpt`` still holds step 7, and with a moving
    average it keeps the trained weights themselves (those of the same run without the average) beside it."""
    checkpoint = {"class_path": "microgpt.callbacks.RunCheckpoint", "init_args": {"every_n_train_steps": 5}}
    average = {"class_path": "microgpt.callbacks.EMA", "init_args": {"decay": 0.5}}

    def fit(root: Path, callbacks: list) -> dict:
        main(fit_command(names, root, "--trainer.max_steps", "7", "--trainer.callbacks", json.dumps(callbacks))[3:])
        return torch.load(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)

    plain = fit(tmp_path / "plain", [checkpoint])
    averaged = fit(tmp_path / "averaged", [checkpoint, average])
    assert plain["global_step"] == averaged["global_step"] == 7
    assert_same_tensors(plain["state_dict"], averaged["current_model_state"])
    assert not all(torch.equal(plain["state_dict"][k], averaged["state_dict"][k]) for k in plain["state_dict"])


def test_last_checkpoint_is_replaced_only_by_a_complete_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 1}, path)

    def die_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert os.listdir(path.parent) == ["last.ckpt"]  # no partial file left behind

    atomic_torch_save({"global_step": 3}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A names file and a real checkpoint trained on it for three steps (in this process)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    names = tmp / "names.txt"
    names.write_text("anna\nbob\ncarla\ndave\neve\nfiona\n")
    main(["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "2", "--trainer.max_steps", "3",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp)])
    return names, tmp / "checkpoints" / "last.ckpt"


def eval_args(names: Path, ckpt: Path, root: Path) -> list[str]:
    return ["validate", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "2",
            "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--trainer.default_root_dir", str(root)]


def test_checkpoints_hold_plain_data_only(checkpoint, tmp_path):
    names, ckpt = checkpoint
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["vocab"] == "abcdefilnorv"
    assert state["global_step"] == 3
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    metrics = main(eval_args(names, ckpt, tmp_path)).trainer.callback_metrics
    assert 0 < float(metrics["val/loss"]) < 10


class Payload:
    """Runs code when unpickled: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(checkpoint, tmp_path, capsys):
    names, ckpt = checkpoint
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    marker = tmp_path / "pwned"
    state["extra"] = Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(state, evil)
    with pytest.raises(SystemExit) as exit_info:
        main(eval_args(names, evil, tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"microgpt: error: {evil}: holds code (it would call getattr when loaded); it will not be loaded."
    )
    assert not marker.exists()


def write_truncated(ckpt: Path, dest: Path) -> None:
    dest.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


def write_other_version(ckpt: Path, dest: Path) -> None:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["microgpt_format"] = 0
    torch.save(state, dest)


@pytest.mark.parametrize("make, problem", [
    (write_truncated, "is truncated (the end of the file is missing)."),
    (lambda ckpt, dest: dest.write_text("anna\nbob\n"), "is not a checkpoint (not a file torch.save writes)."),
    (lambda ckpt, dest: torch.save({"weights": torch.zeros(3)}, dest), "is a torch file but not a training checkpoint."),
    (write_other_version, ("was written by an incompatible version of microgpt "
                           "(checkpoint format 0, this version reads format 1).")),
])
def test_a_bad_checkpoint_is_one_line(checkpoint, tmp_path, capsys, make, problem):
    names, ckpt = checkpoint
    bad = tmp_path / "bad.ckpt"
    make(ckpt, bad)
    for subcommand in ("fit", "validate"):
        args = eval_args(names, bad, tmp_path)
        args[0] = subcommand
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"microgpt: error: {bad}: {problem}"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("anna\nbob\ncarla\ndave\neve\nfiona\n")
    callbacks = '[{"class_path": "microgpt.callbacks.RunCheckpoint", "init_args": {"every_n_train_steps": 1}}]'
    message = error_line(["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "2",
                          "--model.optimizer.lr", "1e30", "--trainer.max_steps", "20", "--trainer.callbacks", callbacks,
                          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], capsys)
    found = re.fullmatch(r"microgpt: error: the training loss is (nan|inf) at step (\d+) \(lr ([^)]+)\); "
                         r"stopped without saving, so the last checkpoint is the last good one\.", message)
    assert found, message
    step, lr = int(found.group(2)), float(found.group(3))
    assert lr == pytest.approx(1e30 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 20)), rel=1e-5)  # cosine, no warmup
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == step - 1  # saved after the last step whose loss was finite
