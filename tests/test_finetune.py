"""Fine-tuning: ``fit --model.init_from CKPT`` starts a new run from a finished run's weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import error_line

from microgpt.checkpoints.loading import load_model
from microgpt.commands import sample
from microgpt.commands.cli import main
from microgpt.data.rows import IGNORE_INDEX
from microgpt.model.gpt import GPT
from microgpt.training.module import MicroGPT

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")
SIZES = {"n_embd": 16, "n_head": 4, "n_layer": 1, "block_size": 8}  # names.yaml's
# no h, q, w, x, y or z: a fine-tuning list with h or z adds a character inside and at the end of the vocabulary
PRETRAIN = ["anna", "bob", "carla", "dave", "eve", "fiona", "greg", "ivan", "julia", "karl", "lena", "mona",
            "nils", "olga", "paul", "rosa", "sven", "tina"]
PRETRAIN_VOCAB = "abcdefgijklmnoprstuv"
Z_NAMES = ["zaza", "zora", "zelda", "zuzu", "zizi", "zoe", "zak", "liz", "oz", "zara", "buzz", "zed", "izzy",
           "zola", "zina", "enzo"]
EMA = {"class_path": "microgpt.callbacks.EMA", "init_args": {"decay": 0.9}}
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}


def write_names(path: Path, names: list[str]) -> Path:
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


def fit_args(names: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "2", "--data.batch_size", "4",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), *extra]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A checkpoint of the seed model trained 40 steps on PRETRAIN."""
    tmp = tmp_path_factory.mktemp("pretrained")
    main(fit_args(write_names(tmp / "names.txt", PRETRAIN), tmp, "--trainer.max_steps", "40"))
    return tmp / "checkpoints" / "last.ckpt"


def test_the_vocabulary_is_the_union_and_known_rows_move_to_their_new_ids(pretrained):
    old, old_tokenizer = load_model(pretrained)
    assert old_tokenizer.chars == PRETRAIN_VOCAB
    torch.manual_seed(7)
    fresh = GPT(len(PRETRAIN_VOCAB) + 3, **SIZES)  # the union below has 2 more characters, and BOS
    torch.manual_seed(7)
    model = MicroGPT(vocab="ahz", init_from=str(pretrained), **SIZES)  # the data's vocabulary: h and z are new

    union = "abcdefghijklmnoprstuvz"  # written out by hand: h goes between g and i, z at the end
    assert model.tokenizer.chars == model.hparams.vocab == union
    assert model.tokenizer.bos == 22 and old_tokenizer.bos == 20
    new_rows = {union.index(c): PRETRAIN_VOCAB.index(c) for c in PRETRAIN_VOCAB} | {22: 20}  # BOS to BOS
    assert new_rows[8] == 7  # i: id 7 before, 8 after
    for name in ("wte.weight", "lm_head.weight"):
        new, before, drawn = model.gpt.state_dict()[name], old.state_dict()[name], fresh.state_dict()[name]
        assert new.shape == (23, 16)
        for row in range(23):
            if row in new_rows:
                assert torch.equal(new[row], before[new_rows[row]]), (name, row)
            else:  # h (7) and z (21): drawn as at initialization, the same numbers a fresh model of this size draws
                assert row in (7, 21)
                assert torch.equal(new[row], drawn[row]), (name, row)
    for name, value in old.state_dict().items():
        if name not in ("wte.weight", "lm_head.weight"):
            assert torch.equal(model.gpt.state_dict()[name], value), name


def test_old_characters_keep_their_logits(pretrained):
    """On text made of old characters only, the remapped model's logits for the old tokens are the old model's."""
    old, old_tokenizer = load_model(pretrained)
    model = MicroGPT(vocab="hz", init_from=str(pretrained), **SIZES).eval()
    texts = ["carla", "bob", "julia", "sven"]
    width = max(len(t) for t in texts) + 1

    def ids(tokenizer, text):
        row = [tokenizer.bos, *tokenizer.encode(text)]
        return row + [tokenizer.bos] * (width - len(row))

    with torch.no_grad():
        before = old(torch.tensor([ids(old_tokenizer, t) for t in texts]))
        after = model(torch.tensor([ids(model.tokenizer, t) for t in texts]))
    columns = [*model.tokenizer.encode(PRETRAIN_VOCAB), model.tokenizer.bos]
    assert after.shape[-1] == before.shape[-1] + 2
    torch.testing.assert_close(after[..., columns], before, rtol=0, atol=1e-6)


class FirstBatch(L.Callback):
    """The first training batch and the loss the module computed on it, before any update."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.batch, self.loss = batch, float(pl_module.step_losses.latest)


@pytest.mark.parametrize("pack", ["false", "true"])
def test_the_first_step_loss_is_the_checkpoint_models_loss(pretrained, tmp_path, pack):
    names = write_names(tmp_path / "names.txt", ["bob", "lola", "nora", "dora", "cora", "ella", "bella", "fiona",
                                                  "olga", "rosa", "carol", "fred", "gina", "lia"])
    cli = main(fit_args(names, tmp_path, "--model.init_from", str(pretrained), "--data.pack", pack,
                        "--trainer.max_steps", "3", "--trainer.callbacks+", json.dumps(EMA))[1:], run=False)
    first = FirstBatch()
    cli.trainer.callbacks.insert(0, first)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.tokenizer.chars == PRETRAIN_VOCAB  # no new characters: the ids are the checkpoint's

    old, _ = load_model(pretrained)
    inputs, targets, positions = first.batch[:3]
    assert (positions is not None) == (pack == "true")
    with torch.no_grad():
        logits = old(inputs, positions=positions)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert first.loss == pytest.approx(float(expected), abs=1e-6)


def test_a_new_character_is_learned_and_the_checkpoint_stands_alone(pretrained, tmp_path, capsys):
    """Fine-tune on names full of z; then sample, test, predict and load with the start checkpoint gone."""
    start = tmp_path / "start.ckpt"
    shutil.copy(pretrained, start)
    names = write_names(tmp_path / "znames.txt", Z_NAMES)
    main(fit_args(names, tmp_path / "ft", "--model.init_from", str(start), "--trainer.max_steps", "60"))
    start.unlink()
    finetuned = tmp_path / "ft" / "checkpoints" / "last.ckpt"
    capsys.readouterr()

    sample.main(["--ckpt_path", str(finetuned), "--num_samples", "20", "--seed", "0"])
    drawn = capsys.readouterr().out.splitlines()
    assert len(drawn) == 20
    assert sum("z" in name for name in drawn) >= 10, drawn
    model = MicroGPT.load_from_checkpoint(finetuned, map_location="cpu")
    assert model.tokenizer.chars == "abcdefgijklmnoprstuvyz"  # Z_NAMES brings y and z

    tested = main(["test", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "2",
                   "--ckpt_path", str(finetuned), "--trainer.logger", "false",
                   "--trainer.default_root_dir", str(tmp_path / "test")])
    assert 0 < float(tested.trainer.callback_metrics["test/loss"]) < 3
    main(["predict", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "2",
          "--ckpt_path", str(finetuned), "--trainer.logger", "false", "--trainer.default_root_dir",
          str(tmp_path / "predict")])
    assert len((tmp_path / "predict" / "predictions.txt").read_text().splitlines()) == 20


def test_a_stopped_finetune_resumes_exactly(pretrained, tmp_path):
    """With dropout, packing and the moving average: 12 steps straight, or 4 steps then ``--ckpt_path`` to 12.
    The resumed run has neither ``init_from`` nor its file, and a data file with fewer characters than the model."""
    start = tmp_path / "start.ckpt"
    shutil.copy(pretrained, start)
    names = write_names(tmp_path / "znames.txt", Z_NAMES)
    last = {"class_path": "microgpt.callbacks.RunCheckpoint"}
    every = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_train_steps": 4, "save_top_k": -1}}  # keeps step=4.ckpt
    callbacks = json.dumps([last, every, EMA])
    recipe = ["--model.dropout", "0.1", "--data.pack", "true", "--trainer.max_steps", "12",
              "--trainer.callbacks", callbacks]
    main(fit_args(names, tmp_path / "straight", "--model.init_from", str(start), *recipe))
    start.unlink()
    step4 = next((tmp_path / "straight" / "checkpoints").glob("*step=4.ckpt"))
    main(fit_args(names, tmp_path / "resumed", "--ckpt_path", str(step4), *recipe))

    expected = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert expected["global_step"] == actual["global_step"] == 12
    for part in ("state_dict", "current_model_state"):
        assert expected[part].keys() == actual[part].keys()
        for key, value in expected[part].items():
            assert torch.equal(value, actual[part][key]), (part, key)


def test_a_finetune_on_two_processes_accumulating_equals_one_process_with_the_whole_batch(pretrained, tmp_path):
    """One 2-process launch for two DDP checks: a fine-tuning start (packed rows, a moving average), and gradient
    accumulation. 2 processes x 2 micro-batches of 4 names: each optimizer step sees names 8k..8k+7, as one
    process with batches of 8 does; the global token count scales the summed gradients on both. In float64, as
    tests/test_accumulation.py: Adam magnifies float32 rounding of the all-reduce's summation order."""
    names = write_names(tmp_path / "znames.txt", Z_NAMES)
    args = fit_args(names, tmp_path / "ddp", "--model.init_from", str(pretrained), "--data.pack", "true",
                    "--trainer.max_steps", "4", "--trainer.callbacks+", json.dumps(EMA), "--trainer.accelerator", "cpu",
                    "--trainer.precision", "64-true")
    ddp = subprocess.run([sys.executable, "-m", "microgpt", *args, "--data.batch_size", "4",
                          "--trainer.accumulate_grad_batches", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                         capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = main([*(arg.replace(str(tmp_path / "ddp"), str(tmp_path / "single")) for arg in args),
                   "--data.batch_size", "8"])
    ddp_state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ddp_state["global_step"] == 4
    assert ddp_state["hyper_parameters"]["vocab"] == "abcdefgijklmnoprstuvyz"
    single_state = single.model.state_dict()
    assert ddp_state["state_dict"].keys() == single_state.keys()
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state["state_dict"][key], value, rtol=0, atol=1e-9)


def not_microgpt(pretrained: Path, dest: Path) -> None:
    state = torch.load(pretrained, weights_only=True)
    del state["hyper_parameters"]
    torch.save(state, dest)


@pytest.mark.parametrize("make, problem", [
    (None, "no such checkpoint file."),
    (lambda ckpt, dest: dest.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2]),
     "is truncated (the end of the file is missing)."),
    (not_microgpt, "not a microgpt checkpoint (no vocabulary inside)."),
])
def test_a_bad_start_checkpoint_is_one_line_and_writes_nothing(pretrained, tmp_path, capsys, make, problem):
    bad = tmp_path / "bad.ckpt"
    if make is not None:
        make(pretrained, bad)
    names = write_names(tmp_path / "names.txt", Z_NAMES)
    line = error_line(fit_args(names, tmp_path / "run", "--model.init_from", str(bad), "--trainer.max_steps", "2"),
                      capsys)
    assert line == f"microgpt: error: --model.init_from {bad}: {problem}"
    assert not (tmp_path / "run").exists()


def test_other_sizes_are_refused_naming_each(pretrained, tmp_path, capsys):
    names = write_names(tmp_path / "names.txt", Z_NAMES)
    line = error_line(fit_args(names, tmp_path / "run", "--model.init_from", str(pretrained),
                               "--model.n_embd", "32", "--model.n_layer", "2"), capsys)
    assert line == (f"microgpt: error: --model.init_from {pretrained}: the checkpoint's model has n_embd 16, "
                    "n_layer 1; this run's has n_embd 32, n_layer 2 (pass the sizes it was trained with, e.g. its "
                    "--config).")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ckpt_path", ["last", "given"])
def test_init_from_with_ckpt_path_is_refused(pretrained, tmp_path, capsys, ckpt_path):
    names = write_names(tmp_path / "names.txt", Z_NAMES)
    line = error_line(fit_args(names, tmp_path / "run", "--model.init_from", str(pretrained), "--ckpt_path",
                               str(pretrained) if ckpt_path == "given" else "last"), capsys)
    assert line == ("microgpt: error: --model.init_from starts a new run from a checkpoint's weights and "
                    "--ckpt_path resumes a run: pass only one (to continue a fine-tuning run, drop "
                    "--model.init_from).")
    assert not (tmp_path / "run").exists()


def test_resuming_on_new_characters_points_to_init_from(pretrained, tmp_path, capsys):
    """Before, a ``size mismatch for gpt.lm_head.weight`` traceback."""
    names = write_names(tmp_path / "names.txt", Z_NAMES)
    line = error_line(fit_args(names, tmp_path / "run", "--ckpt_path", str(pretrained)), capsys)
    assert line == (f"microgpt: error: {pretrained}: the data has characters this run's model does not know: "
                    f"'yz'; to train on a new list, start a new run from its weights with --model.init_from "
                    f"{pretrained}.")
    assert not (tmp_path / "run").exists()


def test_the_finetune_recipe_keeps_the_best_checkpoint(pretrained, tmp_path):
    names = write_names(tmp_path / "znames.txt", Z_NAMES)
    cli = main(["fit", "--config", CONFIG, "--config", str(ROOT / "configs" / "finetune.yaml"),
                "--model.init_from", str(pretrained), "--data.path", str(names), "--data.val_size", "4",
                "--trainer.max_steps", "6", "--trainer.val_check_interval", "2", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    optimizer = cli.config["fit"]["model"]["optimizer"]  # finetune.yaml's lr over the first recipe's AdamW
    assert optimizer["class_path"] == "torch.optim.AdamW" and optimizer["init_args"]["lr"] == 0.0005
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["hyper_parameters"]["vocab"] == "abcdefgijklmnoprstuvyz"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
