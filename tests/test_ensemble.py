"""Averaging the predictions of several trained runs: the model, the test command and the sample command."""

import math
from pathlib import Path

import pytest
import torch

from microgpt.checkpoints.loading import load_model
from microgpt.commands.cli import main
from microgpt.commands.sample import main as sample_main
from microgpt.model.gpt import GPT, Ensemble

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "names.yaml")


def random_gpt(seed: int, vocab_size: int = 7, block_size: int = 8) -> GPT:
    """A GPT with large random weights, so that two of them disagree clearly."""
    torch.manual_seed(seed)
    gpt = GPT(vocab_size, n_embd=16, n_head=4, n_layer=2, block_size=block_size)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0.0, 0.3)
    return gpt.eval()


def test_ensemble_predicts_the_mean_of_its_members_probabilities():
    members = [random_gpt(0), random_gpt(1), random_gpt(2)]
    ensemble = Ensemble(members)
    idx = torch.randint(0, 7, (3, 8))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]] * 3)  # packed rows: three names in each
    for kwargs in ({}, {"positions": positions}):
        with torch.no_grad():
            expected = sum(m(idx, **kwargs).double().softmax(-1) for m in members) / 3
            got = ensemble(idx, **kwargs).double().softmax(-1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert (members[0](idx, **kwargs).softmax(-1) - expected).abs().max() > 0.05  # the members disagree


def test_ensemble_with_caches_gives_the_full_forward_logits():
    ensemble = Ensemble([random_gpt(0), random_gpt(1)])
    idx = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        full = ensemble(idx)
        caches = ensemble.new_caches(2)
        steps = [ensemble(idx[:, :1], caches)[:, -1]]
        steps += [ensemble(idx[:, t : t + 1], caches, start=t)[:, -1] for t in range(1, 6)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-5)


def test_members_must_share_the_context_length():
    with pytest.raises(ValueError, match="context lengths differ"):
        Ensemble([random_gpt(0, block_size=8), random_gpt(1, block_size=4)])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short runs of the seed recipe on one tiny file, with different seeds."""
    tmp = tmp_path_factory.mktemp("ensemble")
    names = tmp / "names.txt"
    names.write_text("anna\nbob\ncarla\ndave\neve\nfiona\ngreg\nhana\nivan\njulia\nkarl\nlena\n")
    ckpts = []
    for seed in (1, 2):
        root = tmp / f"run{seed}"
        main(["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "3", "--seed_everything",
              str(seed), "--trainer.max_steps", "30", "--trainer.default_root_dir", str(root),
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
        ckpts.append(root / "checkpoints" / "last.ckpt")
    return tmp, names, ckpts


def test_test_command_scores_the_average_of_the_checkpoints_predictions(two_runs):
    tmp, names, (first, second) = two_runs
    held_out = tmp / "held_out.txt"
    held_out.write_text("nina\nolga\nbella\n")
    cli = main(["test", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "3",
                "--data.test_path", str(held_out), "--ckpt_path", str(first), "--model.ensemble", f"[{second}]",
                "--trainer.default_root_dir", str(tmp / "eval"), "--trainer.logger", "false"])
    # independently: each checkpoint alone, one name at a time, probabilities averaged in float64
    (gpt_a, tokenizer), (gpt_b, _) = load_model(first), load_model(second)
    total, count = 0.0, 0
    for name in held_out.read_text().split():
        ids = [tokenizer.bos, *tokenizer.encode(name), tokenizer.bos]
        x = torch.tensor([ids[:-1]])
        with torch.no_grad():
            probs = (gpt_a.eval()(x).double().softmax(-1) + gpt_b.eval()(x).double().softmax(-1)) / 2
        total -= sum(math.log(probs[0, t, ids[t + 1]]) for t in range(len(ids) - 1))
        count += len(ids) - 1
    assert float(cli.trainer.callback_metrics["test/loss"]) == pytest.approx(total / count, abs=1e-5)
    alone = main(["test", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "3",
                  "--data.test_path", str(held_out), "--ckpt_path", str(first),
                  "--trainer.default_root_dir", str(tmp / "eval"), "--trainer.logger", "false"])
    assert abs(float(alone.trainer.callback_metrics["test/loss"]) - total / count) > 1e-3


def test_sample_command_with_the_same_checkpoint_twice_draws_the_same_names(two_runs, capsys):
    _, _, (first, _) = two_runs
    sample_main(["--ckpt_path", str(first), "--seed", "3", "--num_samples", "50"])
    alone = capsys.readouterr().out
    sample_main(["--ckpt_path", str(first), str(first), "--seed", "3", "--num_samples", "50"])
    assert capsys.readouterr().out == alone


def test_fit_refuses_an_ensemble_in_one_line(two_runs, capsys):
    tmp, names, (first, _) = two_runs
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "3",
              "--model.ensemble", f"[{first}]", "--trainer.default_root_dir", str(tmp / "refused")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "microgpt: error: --model.ensemble averages finished runs in validate, test and predict; "
        "train each member with its own fit."
    )


def test_a_member_with_another_vocabulary_is_one_line(two_runs, tmp_path, capsys):
    _, names, (first, _) = two_runs
    other_names = tmp_path / "other.txt"
    other_names.write_text("xavier\nyolanda\nzoe\nwim\nxena\n")
    main(["fit", "--config", CONFIG, "--data.path", str(other_names), "--data.val_size", "2", "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(tmp_path / "other"), "--trainer.logger", "false"])
    other = tmp_path / "other" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", CONFIG, "--data.path", str(names), "--data.val_size", "3", "--ckpt_path", str(first),
              "--model.ensemble", f"[{other}]", "--trainer.default_root_dir", str(tmp_path / "eval"),
              "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    vocab = "".join(sorted(set(other_names.read_text().replace("\n", ""))))
    assert err.startswith(f"microgpt: error: {other}: its vocabulary {vocab!r} differs from the first model's ")
    assert err.endswith("so their predictions cannot be averaged.")
