"""Two-process DDP training on CPU (gloo), through the real command line, against one process on the same data."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ddp_probe import RecordRun
from helpers.sampling_reference import drawn_by_hand

from microgpt.commands.cli import main
from microgpt.training.module import MicroGPT

pytestmark = pytest.mark.slow  # several fresh fits or processes: `-m "not slow"` leaves them out

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names-batched.yaml")
STEPS = 6
LOG_EVERY = 3


def common_args(names: Path, root: Path) -> list[str]:
    # one validation name: the second process scores none
    return ["--config", CONFIG, "--data.path", str(names), "--data.val_size", "1", "--data.test_size", "0",
            "--data.batch_size", "8", "--trainer.log_every_n_steps", str(LOG_EVERY),
            "--data.eval_batch_size", "3", "--trainer.max_steps", str(STEPS), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process DDP fit (a subprocess) and one single-process fit of the same recipe on the same names."""
    tmp = tmp_path_factory.mktemp("ddp")
    names = tmp / "names.txt"
    names.write_text("\n".join(a + b for a in ("ka", "lo", "mi", "ne", "su", "ta")
                               for b in ("ra", "li", "no", "bel", "x", "dana")) + "\n")
    probe = json.dumps({"class_path": "helpers.ddp_probe.RecordRun", "init_args": {"out_dir": str(tmp)}})
    # a cache of its own: the session's may already hold a store of a file with the same names
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "MICROGPT_CACHE": str(tmp / "cache")}
    ddp = subprocess.run(
        [sys.executable, "-m", "microgpt", "fit", *common_args(names, tmp / "ddp"), "--trainer.devices", "2",
         "--trainer.strategy", "ddp", f"--trainer.callbacks+={probe}"],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]

    cli = main([*common_args(names, tmp / "single"), "--trainer.devices", "1"], run=False)
    single = RecordRun()
    cli.trainer.callbacks.append(single)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    ckpt = tmp / "ddp" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    return {"ddp": ddp, "ranks": ranks, "single": single, "model": cli.model, "ckpt": ckpt, "names": names}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_commands(names: Path, tmp: Path, port: int) -> list[list[str]]:
    """The multi-node launch of the docs, one command per node: torch's launcher (torchrun) on each, node ranks 0 and 1.
    Run as ``python -m torch.distributed.run`` with this interpreter, so an unactivated virtualenv works too."""
    probe = json.dumps({"class_path": "helpers.ddp_probe.RecordRun", "init_args": {"out_dir": str(tmp)}})
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "microgpt", "fit", *common_args(names, tmp / f"node{node}"),
             "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
             f"--trainer.callbacks+={probe}"] for node in (0, 1)]


@pytest.fixture(scope="module")
def two_nodes(runs, tmp_path_factory):
    """Two simulated nodes, each with its own token-store cache (as on node-local disks), launched at once."""
    tmp = tmp_path_factory.mktemp("nodes")
    names = runs["names"]
    procs = []
    for node, cmd in enumerate(two_node_commands(names, tmp, free_port())):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               "MICROGPT_CACHE": str(tmp / f"cache{node}"), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return {"tmp": tmp, "stderr": [err for _, err in outputs], "ranks": ranks}


def test_both_processes_map_one_store(runs):
    stores = {r["store"] for r in runs["ranks"]}
    assert len(stores) == 1 and all(r["maps_store"] for r in runs["ranks"])
    assert runs["ddp"].stderr.count("microgpt: building the token store") == 1  # by rank 0 only


def test_two_nodes_build_the_store_once_each_and_train_as_one_process(runs, two_nodes):
    tmp, ranks = two_nodes["tmp"], two_nodes["ranks"]
    assert [(r["world_size"], r["node_rank"]) for r in ranks] == [(2, 0), (2, 1)]
    for node, err in enumerate(two_nodes["stderr"]):
        assert err.count("microgpt: building the token store") == 1, err[-2000:]
        assert len(list((tmp / f"cache{node}").glob("*.tokens"))) == 1
        assert ranks[node]["maps_store"] and ranks[node]["store"].startswith(str(tmp / f"cache{node}"))
    for step, global_batch in enumerate(runs["single"].names):
        assert ranks[0]["names"][step] + ranks[1]["names"][step] == global_batch
    for rank in ranks:
        assert rank["losses"] == pytest.approx(runs["single"].losses, abs=1e-6)
        assert rank["val_losses"][-1] == pytest.approx(runs["single"].val_losses[-1], abs=1e-6)


def test_both_processes_ran_all_steps(runs):
    assert [r["world_size"] for r in runs["ranks"]] == [2, 2]
    assert all(len(r["names"]) == STEPS for r in runs["ranks"])


def test_each_process_gets_a_disjoint_half_of_every_global_batch(runs):
    rank0, rank1 = (r["names"] for r in runs["ranks"])
    for step, global_batch in enumerate(runs["single"].names):
        assert len(rank0[step]) == len(rank1[step]) == 4
        assert not set(rank0[step]) & set(rank1[step])
        assert rank0[step] + rank1[step] == global_batch


def test_losses_and_weights_equal_one_process(runs):
    for rank in runs["ranks"]:
        assert rank["losses"] == pytest.approx(runs["single"].losses, abs=1e-6)
    ddp_state = torch.load(runs["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    single_state = runs["model"].state_dict()
    assert ddp_state.keys() == single_state.keys()
    # The gradient all-reduce sums in another order than one process does. Adam divides each gradient by
    # its own running magnitude, so for the odd weight whose gradient is near zero that last-bit float32
    # difference reaches the weight at a few 1e-6; nearly all weights agree to 1e-6.
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=0, atol=1e-5)
        assert ((ddp_state[key] - value).abs() > 1e-6).float().mean() < 1e-3, key
    assert ddp_state["gpt.blocks.1.mlp.fc2.weight"].abs().sum() > 0  # it was trained


def test_val_loss_is_synced_and_equals_one_process(runs):
    """One held-out name: process 0 scores it, process 1 none; the logged value is over both, on both ranks."""
    expected = runs["single"].val_losses[-1]
    for rank in runs["ranks"]:
        assert rank["val_losses"], "no validation ran under DDP"
        assert rank["val_losses"][-1] == pytest.approx(expected, abs=1e-6)


def test_samples_are_printed_once(runs):
    out = runs["ddp"].stdout
    assert [int(i) for i in re.findall(r"^sample +(\d+): ", out, flags=re.MULTILINE)] == list(range(1, 21))
    assert len(re.findall(rf"^final: step {STEPS} ", out + runs["ddp"].stderr, flags=re.MULTILINE)) == 1


def test_ddp_checkpoint_loads_and_samples_in_one_process(runs):
    model = MicroGPT.load_from_checkpoint(runs["ckpt"], map_location="cpu").eval()
    from_ckpt = model.sample(5, generator=torch.Generator().manual_seed(7))
    from_single = runs["model"].sample(5, generator=torch.Generator().manual_seed(7))
    assert from_ckpt == from_single
    assert all(len(s) <= 16 for s in from_ckpt) and any(from_ckpt)


def test_a_step_that_neither_logs_nor_saves_makes_no_collective(runs):
    """DDP's gradient all-reduce (C++, not counted) is the only communication of a quiet step; logging
    steps may sync (the loss, the stop signal and the checkpoint clock are agreed there)."""
    for rank in runs["ranks"]:
        assert rank["logging_steps"] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        assert len(rank["collectives"]) == STEPS
        quiet = [step for step in range(1, STEPS) if step % LOG_EVERY]  # the last step saves last.ckpt
        assert quiet and all(rank["collectives"][step - 1] == {} for step in quiet), rank["collectives"]
        assert rank["collectives"][LOG_EVERY - 1], "the counting saw no collective at all: it is not counting"


@pytest.fixture(scope="module")
def predicted(runs, tmp_path_factory):
    """``predict`` of 5 names on 2 processes, in chunks of at most 2: process 0 makes 3, process 1 makes 2."""
    tmp = tmp_path_factory.mktemp("predict")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MICROGPT_CACHE": str(tmp / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "microgpt", "predict", "--config", CONFIG, "--data.path", str(runs["names"]),
         "--data.val_size", "1", "--data.test_size", "0", "--data.predict_size", "5", "--data.eval_batch_size", "2",
         "--ckpt_path", str(runs["ckpt"]), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp)],
        check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, tmp


def test_predict_on_two_processes_writes_every_name_once_in_one_file(runs, predicted):
    result, tmp = predicted
    lines = re.findall(r"^wrote (\d+) names to (.+)$", result.stdout, flags=re.MULTILINE)
    assert len(lines) == 1 and lines[0][0] == "5"
    names = Path(lines[0][1]).read_text().splitlines()
    assert len(names) == 5 and list(tmp.rglob("predictions*.txt")) == [Path(lines[0][1])]
    # each process draws its own share with its own generator, seeded from the run's seed (42), its rank and
    # the chunk: the same draws made here by hand from the checkpoint, one process at a time
    from microgpt.data.datamodule import chunk_seed

    expected = []
    for rank, chunks in ((0, (2, 1)), (1, (2,))):
        for i, n in enumerate(chunks):
            expected += drawn_by_hand(runs["ckpt"], n, temperature=0.5, seed=chunk_seed(42, rank, i))
    assert names == expected


def test_a_failure_in_one_process_is_one_line_and_nothing_hangs(runs, tmp_path):
    """Process 1 stops with a user error at step 2; process 0, waiting on it, says in one line that it lost
    the connection and points at process 1's line, instead of a traceback."""
    fail = json.dumps({"class_path": "helpers.ddp_probe.FailOnRank", "init_args": {"rank": 1, "step": 2}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "MICROGPT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "microgpt", "fit", *common_args(runs["names"], tmp_path), "--trainer.devices", "2",
         "--trainer.strategy", "ddp", f"--trainer.callbacks+={fail}"],
        check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("microgpt: error:")]
    assert errors[0] == "microgpt: error: process 1 cannot go on (a test's failure)"
    assert all("lost its connection" in line and "process 0" in line for line in errors[1:]), errors


def test_a_resumed_two_process_run_with_dropout_is_exact(runs, tmp_path):
    """Each process saves and gets back its own random state: with dropout, 2 steps + resume + 2 steps on two
    processes end on the same weights as 4 steps straight, though the processes' random states differ."""
    keep = json.dumps({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "MICROGPT_CACHE": str(tmp_path / "cache")}

    def fit(root: str, *extra: str) -> None:
        args = [a if a != str(STEPS) else "4" for a in common_args(runs["names"], tmp_path / root)]
        result = subprocess.run(
            [sys.executable, "-m", "microgpt", "fit", *args, "--model.dropout", "0.3", "--trainer.devices", "2",
             "--trainer.strategy", "ddp", "--trainer.logger", "false", f"--trainer.callbacks+={keep}",
             '--trainer.callbacks+={"class_path": "helpers.ddp_probe.DrawPerRank"}', *extra],
            check=False, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    fit("straight")
    fit("resumed", "--ckpt_path", str(tmp_path / "straight" / "checkpoints" / "step=2.ckpt"))
    straight, resumed = (torch.load(tmp_path / root / "checkpoints" / "last.ckpt", weights_only=True)
                         for root in ("straight", "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    per_rank = straight["rng"]["torch_per_rank"]
    assert len(per_rank) == 2 and not torch.equal(per_rank[0], per_rank[1])  # one state for both would not do
