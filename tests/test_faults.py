"""Faults lose nothing: runs started together in one folder, a full disk, a save killed half-way, and every
error reported as what it is, in one line.

One batch of runs is started at once (subprocesses, one thread each): two fits with seeds 1 and 2 and a
2-process DDP fit with seed 3 in one shared root, a fit of seed 2 whose second checkpoint write stalls
half-way and is killed, and a fit whose disk (a 600 KB tmpfs) fills up after its first checkpoint; where
this process may not mount one, an injected ENOSPC stands in. The tests below read what these runs left behind.
"""

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import error_line
from helpers.names_reference import split_names
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from microgpt.checkpoints.io import FORMAT, FORMAT_KEY, atomic_torch_save, load_checkpoint, resolve_checkpoint
from microgpt.commands.cli import main
from microgpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")
STEPS, EVERY = 20, 5
NAMES = ["anna", "bob", "carla", "dave", "eve", "fiona", "greg", "hana", "ivan", "julia", "karl", "lena", "mona",
         "nils", "olga", "paul", "quinn", "rosa", "sven", "tina", "uma", "vera", "walt", "xena", "yuri", "zoe"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
SAVE_EVERY = {"class_path": "microgpt.callbacks.RunCheckpoint", "init_args": {"every_n_train_steps": EVERY}}
NO_SPACE = f"the disk is full ({os.strerror(errno.ENOSPC)})"


def fit_args(names: Path, root: Path, seed: int, callbacks: list[dict] = (), *extra) -> list[str]:
    """The seed recipe for 20 steps on a few names, the loss logged every step, ``last.ckpt`` every 5 steps."""
    return ["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "4",
            "--seed_everything", str(seed), "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
            "--trainer.callbacks", json.dumps([SAVE_EVERY, *callbacks]), *extra]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "microgpt", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def last_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def scalars(version_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A 600 KB file system of its own (tmpfs), or None where this process may not mount one."""
    folder = tmp_path_factory.mktemp("disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(folder)],
                             capture_output=True, check=False).returncode == 0 if shutil.which("mount") else False
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, disk):
    """The batch of runs started at once (see the module's docstring), once they have ended."""
    tmp = tmp_path_factory.mktemp("faults")
    names = tmp / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    shared, killed = tmp / "shared", tmp / "killed"
    marker = tmp / "halfway"
    slow = {"class_path": "helpers.fault_probe.SlowCheckpointIO", "init_args": {"slow_from": 2, "marker": str(marker)}}
    fill = {"class_path": "helpers.fault_probe.FillDisk", "init_args": {"folder": str(disk), "at_step": EVERY + 1}}
    procs = {seed: start(fit_args(names, shared, seed)) for seed in (1, 2)}
    procs["ddp"] = start(fit_args(names, shared, 3, [], "--data.batch_size", "2", "--trainer.accelerator", "cpu",
                                  "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    procs["killed"] = start(fit_args(names, killed, 2, [], "--trainer.plugins", json.dumps(slow)))
    if disk is not None:  # never fill a disk that is not the test's own
        procs["full"] = start(fit_args(names, disk, 3, [fill]))
    deadline = time.monotonic() + 240
    while not marker.exists():  # half of the second checkpoint is on disk, the rest never will be
        assert procs["killed"].poll() is None, procs["killed"].stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    procs["killed"].send_signal(signal.SIGKILL)
    results = {key: finish(proc) for key, proc in procs.items()}
    assert results["killed"].returncode == -signal.SIGKILL
    if disk is not None:
        (disk / "filler").unlink()  # room again, for what the tests do next
    folders = {yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"]: folder
               for folder in sorted((shared / "lightning_logs").iterdir()) if (folder / "config.yaml").exists()}
    return {"tmp": tmp, "names": names, "shared": shared, "killed": killed, "full": disk, "results": results,
            "folders": folders}


def test_runs_started_together_in_one_folder_each_get_their_own(runs):
    """2 fits and a 2-process DDP fit started at once: 3 folders, each with its own run's config,
    checkpoint and curves. A curve ends at its own checkpoint's val/loss (scored here name by name) and
    starts at its own seed's first loss (computed here, alone)."""
    from microgpt.checkpoints.loading import load_model
    from microgpt.data.datamodule import NamesDataModule
    from microgpt.model.names import score_names

    for key in (1, 2, "ddp"):
        assert runs["results"][key].returncode == 0, runs["results"][key].stderr[-3000:]
    logs = runs["shared"] / "lightning_logs"
    folders = sorted(logs.iterdir())
    assert [f.name for f in folders] == [f"version_{n}" for n in range(3)]
    data = NamesDataModule(path=str(runs["names"]), val_size=4, block_size=8, seed=42)
    data.setup("fit")
    val_names = split_names(data)["val"]
    weights = torch.tensor([min(len(name) + 1, 8) for name in val_names], dtype=torch.float64)
    seeds, finals = [], []
    for folder in folders:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        seeds.append(config["seed_everything"])
        assert (str(config["trainer"]["devices"]) == "2") == (config["seed_everything"] == 3)
        checkpoint = load_checkpoint(folder / "checkpoints" / "last.ckpt")
        assert checkpoint["global_step"] == STEPS
        assert sorted(scalars(folder, "train/loss")) == list(range(STEPS))  # one run's steps, each once
        gpt, tokenizer = load_model(folder / "checkpoints" / "last.ckpt")
        scored = torch.tensor(score_names(gpt, tokenizer, val_names), dtype=torch.float64)
        final = scalars(folder, "val/loss")[STEPS - 1]  # the validation after the last step, inside the fit
        assert final == pytest.approx(float((scored * weights).sum() / weights.sum()), abs=1e-5)
        finals.append(final)
    assert sorted(seeds) == [1, 2, 3]
    assert len(set(finals)) == 3
    expected = {seed: first_loss(runs["names"], runs["tmp"] / f"alone-{seed}", seed) for seed in (1, 2)}
    assert len(set(expected.values())) == 2
    for seed, loss in expected.items():  # each curve starts at its own seed's first loss, computed here on its own
        assert scalars(runs["folders"][seed], "train/loss")[0] == pytest.approx(loss, abs=1e-6)


def first_loss(names: Path, root: Path, seed: int) -> float:
    """The loss of the first training batch under the weights the recipe starts from with ``seed``, from a
    model and data module built here, in this process, as ``fit`` builds them."""
    cli = main(["--config", CONFIG, "--data.path", str(names), "--data.val_size", "4", "--seed_everything", str(seed),
                "--trainer.logger", "false", "--trainer.default_root_dir", str(root)], run=False)
    cli.datamodule.setup("fit")
    with torch.no_grad():
        return float(cli.model.token_nll(next(iter(cli.datamodule.train_dataloader()))).mean())


def test_a_save_killed_half_way_keeps_the_last_checkpoint_and_resumes_exactly(runs):
    """SIGKILL with half of the second checkpoint written: ``last.ckpt`` still holds the first (step 5), and
    ``--ckpt_path last`` from it ends with the weights and losses of the same seed's run that was never
    stopped (seed 2 of the runs started together)."""
    checkpoints = runs["killed"] / "lightning_logs" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    part = [p for p in checkpoints.iterdir() if p.name != "last.ckpt"]
    assert len(part) == 1 and part[0].name.startswith(".last.ckpt.") and part[0].name.endswith(".part")
    assert 0 < part[0].stat().st_size < last.stat().st_size  # killed in the middle of the write
    assert load_checkpoint(last)["global_step"] == EVERY

    assert main(fit_args(runs["names"], runs["killed"], 2, [], "--ckpt_path", "last")).trainer.global_step == STEPS
    expected = torch.load(runs["folders"][2] / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(runs["killed"] / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt",
                        weights_only=True)
    assert actual["global_step"] == STEPS
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, actual["state_dict"][key]), key
    after = scalars(runs["killed"] / "lightning_logs" / "version_1", "train/loss")
    assert sorted(after) == list(range(EVERY, STEPS))
    uninterrupted = scalars(runs["folders"][2], "train/loss")
    assert all(after[s] == uninterrupted[s] for s in after)


def test_a_full_disk_during_a_save_is_one_line_and_the_last_good_checkpoint_still_works(runs, disk, capsys):
    """The disk fills after the checkpoint of step 5: the save at step 10 fails in one line naming the file,
    the full disk and the last good checkpoint; nothing is left beside it; once there is room again,
    ``sample``, ``test`` and ``fit --ckpt_path last`` work from it."""
    if disk is None:
        pytest.skip("cannot mount a tmpfs here: the injected ENOSPC of the next test stands in")
    result = runs["results"]["full"]
    assert result.returncode == 2
    last = runs["full"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last_line(result) == (f"microgpt: error: cannot write the checkpoint {last}: {NO_SPACE}; "
                                 f"the last good checkpoint is still {last} (step {EVERY}).")
    assert os.listdir(last.parent) == ["last.ckpt"]
    assert load_checkpoint(last)["global_step"] == EVERY

    from microgpt.commands.sample import main as sample

    sample(["--ckpt_path", "last", "--root_dir", str(runs["full"]), "--num_samples", "5", "--seed", "1"])
    assert len(capsys.readouterr().out.splitlines()) == 5
    data = ["--data.path", str(runs["names"]), "--data.val_size", "4", "--data.test_size", "4"]
    tested = main(["test", "--config", CONFIG, *data, "--ckpt_path", "last", "--trainer.logger", "false",
                   "--trainer.default_root_dir", str(runs["full"]), "--trainer.enable_progress_bar", "false"])
    assert 0 < float(tested.trainer.callback_metrics["test/loss"]) < 10
    resumed = main(fit_args(runs["names"], runs["full"], 3, [], "--ckpt_path", "last"))
    assert resumed.trainer.global_step == STEPS
    assert load_checkpoint(runs["full"] / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")[
        "global_step"] == STEPS


def test_an_injected_enospc_during_a_save_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted, a write that fails as a full disk does (and everywhere, the message)."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 5, "state_dict": {}, FORMAT_KEY: FORMAT}, path)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.file = real_fdopen(fd, mode)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(UserError) as failed:
        atomic_torch_save({"global_step": 10, "state_dict": {}, FORMAT_KEY: FORMAT}, path)
    monkeypatch.undo()
    assert str(failed.value) == (f"cannot write the checkpoint {path}: {NO_SPACE}; "
                                 f"the last good checkpoint is still {path} (step 5).")
    assert os.listdir(path.parent) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 5


def test_a_full_disk_under_the_token_store_is_one_line_and_leaves_nothing(runs, disk, tmp_path, capsys):
    if disk is None:
        pytest.skip("cannot mount a tmpfs here")
    from helpers.fault_probe import fill

    names = tmp_path / "other.txt"
    names.write_text("\n".join(reversed(NAMES)) + "\n")  # a file of its own, so no store of it exists yet
    cache = disk / "cache"
    cache.mkdir(exist_ok=True)
    filler = fill(disk)
    try:
        line = error_line(["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "4",
                           "--data.cache_dir", str(cache), "--trainer.max_steps", "1", "--trainer.logger", "false",
                           "--trainer.default_root_dir", str(tmp_path)], capsys)
    finally:
        filler.unlink()
    assert line.startswith(f"microgpt: error: cannot write the token store {cache}/names-")
    assert line.endswith(f".tokens: {NO_SPACE}; point --data.cache_dir or the MICROGPT_CACHE environment "
                         "variable at a writable directory.")
    assert os.listdir(cache) == []


def test_a_full_disk_under_the_predictions_is_one_line_and_leaves_nothing(runs, disk, capsys):
    """The disk fills as ``predict`` starts: ``predictions.txt`` is not written, in one line, and nothing
    half-written is left beside it; ``sample --output`` the same. A disk full from the start fails in
    Lightning's or TensorBoard's writers (the config, the curves), in one line too."""
    if disk is None:
        pytest.skip("cannot mount a tmpfs here")
    from helpers.fault_probe import fill as fill_disk

    ckpt = runs["folders"][1] / "checkpoints" / "last.ckpt"
    fill = {"class_path": "helpers.fault_probe.FillDisk", "init_args": {"folder": str(disk)}}
    root = disk / "predict"
    predict = ["predict", "--config", CONFIG, "--data.path", str(runs["names"]), "--data.val_size", "4",
               "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
               "false"]
    try:
        # without a logger, nothing else writes once predict has started (TensorBoard's thread might)
        line = error_line([*predict, "--trainer.logger", "false", f"--trainer.callbacks+={json.dumps(fill)}"], capsys)
        assert line == f"microgpt: error: cannot write {root / 'predictions.txt'}: {NO_SPACE}"
        assert not [p for p in root.iterdir() if "predictions" in p.name]

        from microgpt.commands.sample import main as sample

        with pytest.raises(SystemExit) as stop:
            sample(["--ckpt_path", str(ckpt), "--output", str(disk / "names.txt")])
        assert stop.value.code == 2
        # the threads line comes first (microgpt.threads), then the error
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"microgpt sample: error: cannot write {disk / 'names.txt'}: {NO_SPACE}; nothing was written.")
        assert not [p for p in disk.iterdir() if "names.txt" in p.name]

        shutil.rmtree(root)
        (disk / "filler").unlink()
        fill_disk(disk)
        line = error_line(predict, capsys)  # the file is named when the writer's error names it
        assert re.fullmatch(rf"microgpt: error: cannot write (\S+|to the disk): {re.escape(NO_SPACE)}\.", line)
    finally:
        (disk / "filler").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def checkpoint(runs) -> Path:
    return runs["shared"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def unreadable(ckpt: Path, dest: Path) -> list[str]:
    """A copy nobody may read; as root, read by a process without the capabilities that override that."""
    shutil.copy(ckpt, dest)
    dest.chmod(0)
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("root without setpriv: every file is readable")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def newer_torch(ckpt: Path, dest: Path) -> None:
    """The checkpoint with its archive's serialization version set beyond what this torch reads."""
    import zipfile

    with zipfile.ZipFile(ckpt) as old, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info, b"99\n" if info.filename.endswith("/version") else old.read(info))


def newer_microgpt(ckpt: Path, dest: Path) -> None:
    state = torch.load(ckpt, weights_only=True)
    state[FORMAT_KEY] = FORMAT + 1
    torch.save(state, dest)


def damaged(ckpt: Path, dest: Path) -> None:
    """Whole (its zip end record is there), with the pickled data overwritten."""
    data = bytearray(ckpt.read_bytes())
    start = data.index(b"data.pkl") + len(b"data.pkl")
    data[start + 40 : start + 140] = bytes(100)
    dest.write_bytes(bytes(data))


class RunsCode:
    """Unpickling it calls ``os.getcwd``: code, however harmless, that a checkpoint must not hold."""

    def __reduce__(self):
        return os.getcwd, ()


def event_file(ckpt: Path, dest: Path) -> None:
    shutil.copy(next((ckpt.parents[1]).glob("events.out.tfevents.*")), dest)


@pytest.mark.parametrize("make, problem", [
    (lambda ckpt, dest: None, "no such checkpoint file."),
    (lambda ckpt, dest: dest.write_bytes(b"\x00" + random.Random(0).randbytes(5000)),
     "is not a checkpoint (not a file torch.save writes)."),
    (lambda ckpt, dest: shutil.copy(ckpt.parents[1] / "config.yaml", dest),
     "is not a checkpoint (not a file torch.save writes)."),
    (event_file, "is not a checkpoint (not a file torch.save writes)."),
    (lambda ckpt, dest: dest.write_bytes(pickle.dumps({"state_dict": RunsCode()})),
     "is a pickle that holds code (it would call posix.getcwd when loaded); it will not be loaded."),
    (lambda ckpt, dest: torch.save({"state_dict": RunsCode()}, dest),
     "holds code (it would call posix.getcwd when loaded); it will not be loaded."),
    (lambda ckpt, dest: dest.mkdir(), "is a directory, not a checkpoint file."),
    (lambda ckpt, dest: dest.write_bytes(b""), "is empty (0 bytes), not a checkpoint."),
    (lambda ckpt, dest: dest.write_bytes(ckpt.read_bytes()[:-300]), "is truncated (the end of the file is missing)."),
    (lambda ckpt, dest: dest.write_text("anna\nbob\n"), "is not a checkpoint (not a file torch.save writes)."),
    (damaged, "is damaged ("),
    (newer_microgpt, (f"was written by a newer version of microgpt (checkpoint format {FORMAT + 1}, this version "
                      f"reads format {FORMAT}); upgrade microgpt to load it.")),
    (newer_torch, (f"was written by a newer version of torch than this one ({torch.__version__}): Attempted to "
                   "read a PyTorch file with version 99")),
])
def test_each_way_a_checkpoint_cannot_load_is_reported_as_what_it_is(checkpoint, tmp_path, make, problem):
    bad = tmp_path / "bad.ckpt"
    make(checkpoint, bad)
    with pytest.raises(UserError) as failed:
        load_checkpoint(bad)
    assert str(failed.value).startswith(f"{bad}: {problem}")
    assert "weights_only" not in str(failed.value)  # torch's advice to load it anyway, which would run its code


def test_an_unreadable_checkpoint_is_reported_as_unreadable(checkpoint, tmp_path):
    bad = tmp_path / "secret.ckpt"
    prefix = unreadable(checkpoint, bad)
    result = subprocess.run([*prefix, sys.executable, "-m", "microgpt", "sample", "--ckpt_path", str(bad)],
                            capture_output=True, text=True, env=ENV, check=False)
    assert result.returncode == 2
    assert last_line(result) == f"microgpt sample: error: {bad}: cannot be read (permission denied)."


@pytest.mark.parametrize("device, problem", [
    ("cuda", "this machine has no CUDA device (torch.cuda.is_available() is False)."),
    ("cuda:99", "this machine has "),
    ("foo", "not a torch device name (cpu, cuda, cuda:1, mps, xpu, ...)."),
])
def test_sample_on_a_device_this_machine_lacks_is_one_line_naming_it(checkpoint, capsys, device, problem):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from microgpt.commands.sample import main as sample

    with pytest.raises(SystemExit) as stop:
        sample(["--ckpt_path", str(checkpoint), "--device", device])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"microgpt sample: error: --device {device}: {problem}")
    with pytest.raises(UserError) as failed:  # the library call names the device and the file, not a damage
        load_checkpoint(checkpoint, map_location=device)
    assert str(failed.value).startswith(f"{checkpoint}: cannot be loaded onto device {device}: {problem[:-1]}")


def test_sample_loads_on_the_cpu_and_moves_the_model(checkpoint, monkeypatch):
    """Whatever ``--device``, the file is read onto the CPU (a GPU-saved checkpoint loads anywhere)."""
    from microgpt.checkpoints import loading

    seen = []
    real = loading.load_checkpoint
    monkeypatch.setattr(loading, "load_checkpoint", lambda path, map_location: seen.append(map_location) or real(
        path, map_location))
    gpt, _ = loading.load_model(checkpoint, "meta")
    assert seen == ["cpu"] and next(gpt.parameters()).device.type == "meta"


def test_last_and_best_mean_that_file_of_the_newest_run(tmp_path, capsys):
    """The README's rule: the newest run is the one whose newest checkpoint was written last, finished or
    running (on equal times the higher version); ``last`` and ``best`` are its files, never another run's,
    and the file taken is named in one line."""
    paths = {}
    for version in (0, 1, 2):
        paths[version] = tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt"
        atomic_torch_save({"global_step": version}, paths[version])
    best = paths[0].parent / "best.ckpt"
    atomic_torch_save({"global_step": 0}, best)
    (paths[2].parent / ".last.ckpt.x.part").write_bytes(b"half")
    (tmp_path / "lightning_logs" / "version_3").mkdir()  # a run that saved nothing (validate, test, predict)
    os.utime(paths[0], ns=(3 * 10**18, 3 * 10**18))  # version 0, resumed and still running, saved last
    for path in (best, paths[1], paths[2]):
        os.utime(path, ns=(2 * 10**18, 2 * 10**18))
    capsys.readouterr()
    assert resolve_checkpoint("last", tmp_path, "--root") == str(paths[0])
    assert capsys.readouterr().err == f"microgpt: --ckpt_path last is {paths[0]}\n"
    assert resolve_checkpoint("best", tmp_path, "--root") == str(best)
    os.utime(paths[0], ns=(1 * 10**18, 1 * 10**18))
    assert resolve_checkpoint("last", tmp_path, "--root") == str(paths[2])  # same time as version 1: the higher
    with pytest.raises(UserError) as failed:  # version 0's best.ckpt is another run's
        resolve_checkpoint("best", tmp_path, "--root")
    assert str(failed.value) == (f"--ckpt_path best: no best.ckpt in the newest run under {tmp_path}, "
                                 f"{paths[2].parents[1]} (a run writes best.ckpt when it validates during fit); "
                                 "pass a checkpoint file to take another run's.")
    assert resolve_checkpoint("lightning_logs/version_0/checkpoints/best.ckpt", tmp_path, "--root") == (
        "lightning_logs/version_0/checkpoints/best.ckpt")
    assert resolve_checkpoint("last", tmp_path / "empty", "--root", start_afresh=True) is None
    with pytest.raises(UserError, match=r"--ckpt_path last: no last.ckpt under .*empty \(no run there saved a "
                                        r"checkpoint\); pass a checkpoint file or --root\.$"):
        resolve_checkpoint("last", tmp_path / "empty", "--root")


def test_sample_and_test_name_the_checkpoint_they_took(checkpoint, runs, tmp_path, capsys):
    from microgpt.commands.sample import main as sample

    root = checkpoint.parents[3]
    newest = Path(resolve_checkpoint("last", root, "--root_dir"))
    capsys.readouterr()
    sample(["--ckpt_path", "last", "--root_dir", str(root), "--num_samples", "2"])
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == f"microgpt sample: --ckpt_path last is {newest}"
    assert [line for line in captured.err.splitlines()[1:] if not line.startswith("threads: ")] == []
    assert len(captured.out.splitlines()) == 2


@pytest.mark.parametrize("logger", [[], ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "ROOT"]])
def test_runs_built_together_claim_their_folders_before_writing_anything(tmp_path, logger):
    """Two runs set up before either has written a line get two folders (Lightning's listing gave both 0)."""
    args = ["--config", CONFIG, "--data.path", str(tmp_path / "names.txt"), "--data.val_size", "4",
            "--trainer.default_root_dir", str(tmp_path), *[str(tmp_path) if a == "ROOT" else a for a in logger]]
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    first, second = main(args, run=False), main(args, run=False)
    assert (first.trainer.logger.version, second.trainer.logger.version) == (0, 1)
    assert type(first.trainer.logger).__name__ == ("CSVLogger" if logger else "RunLogger")  # TensorBoard's
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_a_run_that_writes_nothing_leaves_no_folder(tmp_path):
    """A process that claimed a folder and ended before writing there (here: built, never run) removes it."""
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    args = ["--config", CONFIG, "--data.path", str(tmp_path / "names.txt"), "--data.val_size", "4",
            "--trainer.default_root_dir", str(tmp_path)]
    code = f"from microgpt.commands.cli import main; print(main({args!r}, run=False).trainer.log_dir)"
    built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.strip().splitlines()[-1] == str(tmp_path / "lightning_logs" / "version_0")
    assert list((tmp_path / "lightning_logs").iterdir()) == []
