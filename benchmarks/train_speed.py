"""Training speed of the Lightning project against a plain PyTorch loop of the same model, data and optimizer.

    python benchmarks/train_speed.py --names ../shared/data/names.txt            # the three goals, ~5 minutes
    python benchmarks/train_speed.py --names ../shared/data/names.txt --lean     # in-process steps/s, lean Trainer
    python benchmarks/train_speed.py --names ../shared/data/names.txt --profile  # where a default-config step goes
    python benchmarks/train_speed.py --names ../shared/data/names.txt --interleaved  # (2, 3) with the drift cancelled

The goals (default): every figure is the wall time of a fresh process, as a user runs it, median of
``--rounds``. (1) The seed recipe end to end, ``microgpt fit --config configs/names.yaml`` as shipped,
against this file run as a plain script (``--plain-script``: read, train, score, sample, save). (2, 3) The
marginal step time of the shipped config, ``(T(long run) - T(short run)) / extra steps``, against the same
difference for the plain script: the seed model at batch 1 (``names.yaml``) and makemore's size
(``names-batched.yaml`` with ``--model.n_layer 4``: 4 layers, 64-dim, context 16, batch 32). Both runs
validate once, after their last step (``--trainer.val_check_interval`` = their steps), as the seed recipe
does, so start-up, scoring and sampling cancel out of (2) and (3). The plain loop uses the same ``microgpt.model.gpt.GPT`` (three
q/k/v matrices), batches, AdamW groups and schedule.

``--interleaved``: rows (2) and (3) measured so that the machine's drift cancels out. Each round is a fresh
``microgpt fit`` of the shipped config with one more callback, which after every ``block`` Lightning steps runs
``block`` steps of the plain loop (same names, model and optimizer, a model of its own) in the same process;
Lightning's time per step is the time between those pauses. A quiet 2-core machine still drifts by 10-20%
over seconds, which moves the fresh-process wall-clock ratios more than the differences being measured.

``--lean``: in one process, rounds alternate ``Trainer.fit`` of ``MicroGPT`` with no logger, checkpointing,
progress bar or validation, and the plain loop; steps per second after the first tenth, best round.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from microgpt.model.gpt import GPT
from microgpt.model.sampling import SampleRequest, generate

SETTINGS = {
    "seed (batch 1, 16-dim, 1 layer, context 8)":
        {"batch_size": 1, "n_embd": 16, "n_head": 4, "n_layer": 1, "block_size": 8, "steps": 500},
    "makemore size (batch 32, 64-dim, 4 layers, 4 heads, context 16)":
        {"batch_size": 32, "n_embd": 64, "n_head": 4, "n_layer": 4, "block_size": 16, "steps": 150},
    "names-best size (batch 64, 128-dim, 4 layers, 4 heads, context 16)":
        {"batch_size": 64, "n_embd": 128, "n_head": 4, "n_layer": 4, "block_size": 16, "steps": 150},
    "names-best size, Lightning side with --data.pack":
        {"batch_size": 64, "n_embd": 128, "n_head": 4, "n_layer": 4, "block_size": 16, "steps": 150, "pack": True},
}


def optimizer_and_schedule(gpt: torch.nn.Module, lr: float, total: int):
    """AdamW with the project's decay groups (weight decay 0 here) and its cosine schedule without warmup."""
    embeddings = {id(m.weight) for m in gpt.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in gpt.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in gpt.parameters() if p.dim() < 2 or id(p) in embeddings]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine)


class PlainSteps:
    """The plain loop, resumable: ``run(k)`` trains ``k`` more steps and returns the last loss."""

    def __init__(self, encoded, vocab_size, batch_size, n_embd, n_head, n_layer, block_size, steps, lr=1e-2,
                 device="cpu"):
        self.inputs, self.targets = encoded["inputs"].to(device), encoded["targets"].to(device)
        self.lengths = encoded["lengths"]
        self.batch_size, self.step = batch_size, 0
        torch.manual_seed(42)
        self.gpt = GPT(vocab_size, n_embd, n_head, n_layer, block_size).to(device)
        self.opt, self.schedule = optimizer_and_schedule(self.gpt, lr, steps)

    def run(self, k: int) -> torch.Tensor:
        n = len(self.lengths)
        for _ in range(k):
            idx = torch.arange(self.step * self.batch_size, (self.step + 1) * self.batch_size) % n
            T = int(self.lengths[idx].max())
            rows = idx.to(self.inputs.device)
            x, y = self.inputs[rows, :T], self.targets[rows, :T]
            loss = F.cross_entropy(self.gpt(x).flatten(0, 1), y.flatten(), ignore_index=-100)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.schedule.step()
            self.step += 1
        return loss


def plain_train(encoded, vocab_size, batch_size, n_embd, n_head, n_layer, block_size, steps, lr=1e-2):
    """The plain loop; returns (seconds per timed step, the timed steps' target-token count, final loss)."""
    loop = PlainSteps(encoded, vocab_size, batch_size, n_embd, n_head, n_layer, block_size, steps, lr)
    warm = steps // 10
    loop.run(warm)
    start = time.perf_counter()
    loss = loop.run(steps - warm)
    seconds = (time.perf_counter() - start) / (steps - warm)
    timed = torch.arange(warm * batch_size, steps * batch_size) % len(loop.lengths)
    return seconds, int(loop.lengths[timed].sum()), float(loss.detach())


def lightning_train(names, batch_size, n_embd, n_head, n_layer, block_size, steps, lr=1e-2, pack=False, profile=None):
    """The project's LightningModule and DataModule under a lean Trainer; returns seconds per timed step.
    With ``pack``, the data module packs several names per row (the plain loop always pads one name per row)."""
    import lightning as L

    from microgpt.data.datamodule import NamesDataModule
    from microgpt.training.module import MicroGPT

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == steps // 10:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    L.seed_everything(42, verbose=False)
    data = NamesDataModule(path=str(names), block_size=block_size, batch_size=batch_size, pack=pack)
    optimizer = partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    model = MicroGPT(data.vocab, n_embd, n_head, n_layer, block_size, optimizer=optimizer)
    clock = Clock()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[clock])
    if profile is not None:
        profile.enable()
    trainer.fit(model, datamodule=data)
    if profile is not None:
        profile.disable()
    return clock.seconds / (steps - steps // 10), float(model.step_losses.latest)


def throughput(names: Path, rounds: int, scale: float) -> None:
    from microgpt.data.datamodule import NamesDataModule

    print(f"Training-step throughput, best of {rounds} alternating rounds, warm-up steps excluded")
    print(f"{'setting':<66} {'side':<10} {'steps/s':>9} {'tokens/s':>10} {'Lightning/plain':>16}")
    for label, s in SETTINGS.items():
        steps = max(20, int(s["steps"] * scale))
        config = {k: v for k, v in s.items() if k not in ("steps", "pack")}
        data = NamesDataModule(path=str(names), block_size=s["block_size"])
        rows = data.split.rows("train", data.tokenizer, s["block_size"])
        encoded = rows.cut(torch.arange(len(rows)))
        plain, lean = [], []
        for _ in range(rounds):
            lean.append(lightning_train(names, **config, steps=steps, pack=s.get("pack", False))[0])
            seconds, tokens, _ = plain_train(encoded, data.tokenizer.vocab_size, **config, steps=steps)
            plain.append(seconds)
        timed = steps - steps // 10
        best_lean, best_plain = min(lean), min(plain)
        for side, sec in (("Lightning", best_lean), ("plain", best_plain)):
            ratio = f"{best_plain / best_lean:.2f}x" if side == "Lightning" else ""
            print(f"{label:<66} {side:<10} {1 / sec:>9.1f} {tokens / timed / sec:>10.0f} {ratio:>16}")


GOALS = {  # label: (config, extra flags, plain-script settings, short steps, long steps)
    "seed model at batch 1 (configs/names.yaml)": ("names.yaml", [], {"batch_size": 1, "n_embd": 16, "n_layer": 1,
                                                                            "block_size": 8}, 100, 2100),
    "makemore size: batch 32, 64-dim, 4 layers, context 16 (names-batched.yaml, n_layer 4)":
        ("names-batched.yaml", ["--model.n_layer", "4"], {"batch_size": 32, "n_embd": 64, "n_layer": 4, "block_size": 16},
         50, 350),
}


def wall(args: list[str], cwd: str) -> float:
    """Seconds a fresh ``python ARGS`` takes, start to exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env, cwd=cwd)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def goals(names: Path, rounds: int, flags: list[str] | None = None, rows: str = "all") -> None:
    """The issue's three rows, each a median of ``rounds`` fresh-process measurements, sides alternating.
    ``flags`` are added to every ``microgpt fit`` (to measure a lever); ``rows="seed"`` measures only the
    seed model's marginal step."""
    print(f"Fresh processes, median of {rounds}; ratio = Lightning (shipped config) / plain script\n")
    with tempfile.TemporaryDirectory() as tmp:
        def fit(config: str, extra: list[str], steps: int | None = None) -> float:
            # one validation, after the last step, as in the seed recipe: the difference is training steps only
            steps_flag = [] if steps is None else ["--trainer.max_steps", str(steps),
                                                   "--trainer.val_check_interval", str(steps)]
            return wall(["-m", "microgpt", "fit", "--config", str(ROOT / "configs" / config), *extra, *steps_flag,
                         *(flags or []), "--data.path", str(names), "--trainer.default_root_dir", tmp], tmp)

        def plain(settings: dict, steps: int = 500) -> float:
            flags = [f"--{k}={v}" for k, v in {**settings, "steps": steps}.items()]
            return wall([__file__, "--plain-script", "--names", str(names), *flags], tmp)

        lightning, baseline = [], []
        for _ in range(rounds if rows == "all" else 0):
            lightning.append(fit("names.yaml", []))
            baseline.append(plain(GOALS["seed model at batch 1 (configs/names.yaml)"][2]))
        if lightning:
            a, b = median(lightning), median(baseline)
            print(f"{'seed recipe end to end: microgpt fit --config configs/names.yaml':<90} {a:7.2f} s")
            print(f"{'  the plain script (500 steps, score 1000 names, 20 samples)':<90} {b:7.2f} s   {a / b:.2f}x")
        for label, (config, extra, settings, short, long) in list(GOALS.items())[: 1 if rows == "seed" else None]:
            lightning, baseline = [], []
            for _ in range(rounds):
                lightning.append((fit(config, extra, long) - fit(config, extra, short)) / (long - short))
                baseline.append((plain(settings, long) - plain(settings, short)) / (long - short))
            a, b = median(lightning), median(baseline)
            print(f"{'marginal step, ' + label:<90} {1000 * a:7.3f} ms")
            print(f"{'  the plain script':<90} {1000 * b:7.3f} ms   {a / b:.2f}x")
        imports = [("python -c 'import torch'", "import torch"),
                   ("python -c 'import microgpt.commands.cli' (the start-up imports of fit)", "import microgpt.commands.cli")]
        for label, code in imports if rows == "all" else []:
            print(f"{label:<90} {median([wall(['-c', code], tmp) for _ in range(rounds)]):7.2f} s")



INTERLEAVED = {  # GOALS' label: (steps, block) of a round
    "seed model at batch 1 (configs/names.yaml)": (4000, 100),
    "makemore size: batch 32, 64-dim, 4 layers, context 16 (names-batched.yaml, n_layer 4)": (600, 20),
}


def interleaved_round(names: Path, label: str) -> None:
    """One fresh-process round of ``--interleaved``; prints Lightning's and the plain loop's seconds per step."""
    import contextlib

    import lightning as L

    from microgpt.commands.cli import main as cli_main

    config, extra, settings = GOALS[label][:3]
    steps, block = INTERLEAVED[label]
    warm = steps // 10

    class Interleave(L.Callback):
        lightning = plain = 0.0
        lightning_steps = plain_steps = 0

        def on_train_start(self, trainer, pl_module):
            dm = trainer.datamodule
            rows = dm.split.rows("train", dm.tokenizer, settings["block_size"])
            encoded = rows.cut(torch.arange(len(rows)))
            self.loop = PlainSteps(encoded, dm.tokenizer.vocab_size, **settings, n_head=4, steps=steps)
            self.mark = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step < warm or trainer.global_step % block:
                return
            if self.mark is not None:
                self.lightning += time.perf_counter() - self.mark
                self.lightning_steps += block
            start = time.perf_counter()
            self.loop.run(block)
            self.plain += time.perf_counter() - start
            self.plain_steps += block
            self.mark = time.perf_counter()

    clock = Interleave()
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        cli = cli_main(["--config", str(ROOT / "configs" / config), *extra, "--data.path", str(names),
                        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                        "--trainer.default_root_dir", tmp], run=False)
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print(clock.lightning / clock.lightning_steps, clock.plain / clock.plain_steps)


def interleaved(names: Path, rounds: int) -> None:
    print(f"Interleaved in one fresh process per round (shipped config vs the plain loop), median of {rounds}\n")
    for label in INTERLEAVED:
        ratios, lightning, plain = [], [], []
        for _ in range(rounds):
            out = subprocess.run([sys.executable, __file__, "--names", str(names), "--interleaved-round", label],
                                 check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            a, b = map(float, out.stdout.split()[-2:])
            lightning.append(a)
            plain.append(b)
            ratios.append(a / b)
        print(f"{'marginal step, ' + label:<90} {1000 * median(lightning):7.3f} ms")
        print(f"{'  the plain loop, in the same process':<90} {1000 * median(plain):7.3f} ms   "
              f"{median(ratios):.2f}x (median ratio; rounds {', '.join(f'{r:.2f}' for r in ratios)})")


def plain_script(names: Path, steps: int = 500, batch_size: int = 1, n_embd: int = 16, n_layer: int = 1,
                 block_size: int = 8) -> None:
    """A recipe end to end without a framework (torch and the GPT class only): read, train, score, sample, save."""
    import random

    lines = [n.strip() for n in names.read_text(encoding="utf-8").splitlines() if n.strip()]
    random.Random(42).shuffle(lines)
    train, val = lines[:-1000], lines[-1000:]
    chars = sorted(set("".join(lines)))
    stoi, bos = {c: i for i, c in enumerate(chars)}, len(chars)

    def encode(name: str) -> list[int]:
        return ([bos] + [stoi[c] for c in name] + [bos])[: block_size + 1]

    def batch(names_: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [encode(name) for name in names_]
        width = max(map(len, rows))
        x = torch.tensor([r[:-1] + [bos] * (width - len(r)) for r in rows])
        y = torch.tensor([r[1:] + [-100] * (width - len(r)) for r in rows])
        return x, y

    torch.manual_seed(42)
    gpt = GPT(len(chars) + 1, n_embd, 4, n_layer, block_size)
    opt, schedule = optimizer_and_schedule(gpt, 1e-2, steps)
    for step in range(steps):
        x, y = batch([train[(step * batch_size + i) % len(train)] for i in range(batch_size)])
        loss = F.cross_entropy(gpt(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    gpt.eval()
    with torch.no_grad():
        x, y = batch(val)
        nll = F.cross_entropy(gpt(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    print(f"val loss {float(nll):.4f}")
    for i, ids in enumerate(generate(gpt, [SampleRequest([bos], 20, 0.5)], bos)[0].tokens, 1):
        print(f"sample {i:2d}: {''.join(chars[t] for t in ids)}")
    torch.save(gpt.state_dict(), "plain_seed.pt")


def profile_lightning(names: Path, steps: int = 2000) -> None:
    """cProfile ``fit --config configs/names.yaml`` as shipped (progress bar to /dev/null), for ``steps`` steps;
    split its own time by package, break one step down, and list Lightning's hot spots."""
    import contextlib

    from microgpt.commands.cli import main as cli_main

    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        cli = cli_main(["--config", str(ROOT / "configs" / "names.yaml"), "--data.path", str(names),
                        "--trainer.max_steps", str(steps), "--trainer.default_root_dir", tmp], run=False)
        profile.enable()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        profile.disable()
    s = {"steps": steps}
    stats = pstats.Stats(profile)
    by_package: dict[str, float] = defaultdict(float)
    for (file, _, _), (_, _, tottime, _, _) in stats.stats.items():
        parts = Path(file).parts
        if "site-packages" in parts:
            package = parts[parts.index("site-packages") + 1]
        elif "microgpt" in parts:
            package = "microgpt"
        elif file == "~":
            package = "C functions (torch ops, builtins)"
        else:
            package = "python stdlib"
        by_package[package] += tottime
    total = sum(by_package.values())
    print(f"\nProfile of the shipped seed recipe's fit, {s['steps']} steps: {total:.2f} s of own time by package")
    for package, sec in sorted(by_package.items(), key=lambda kv: -kv[1]):
        print(f"  {package:<40} {sec:>6.2f} s  {100 * sec / total:>5.1f}%")
    cumulative: dict[tuple[str, str], float] = defaultdict(float)
    for (file, _, func), (_, _, _, cumtime, _) in stats.stats.items():
        cumulative[(file, func)] += cumtime

    def cum(path_part: str, func: str) -> float:
        return sum(t for (file, f), t in cumulative.items() if path_part in file and f == func)

    loop = cum("training_epoch_loop.py", "advance")
    parts = {
        "forward + loss (MicroGPT.training_step without self.log)":
            cum("microgpt/training/module.py", "training_step") - cum("lightning/pytorch/core/module.py", "log"),
        "self.log('train/loss')": cum("lightning/pytorch/core/module.py", "log"),
        "backward": cum("torch/_tensor.py", "backward"),
        "Adam update": cum("torch/optim/adam.py", "adam"),
        "zero_grad": cum("torch/optim/optimizer.py", "zero_grad"),
        "lr schedule step": cum("lightning/pytorch/loops/training_epoch_loop.py", "update_lr_schedulers"),
        "next batch (Lightning fetcher, DataLoader, TrainBatches)": cum("loops/fetchers.py", "__next__"),
        "callback hooks (all)": cum("lightning/pytorch/trainer/call.py", "_call_callback_hooks"),
        "  of which the progress bar": cum("progress/tqdm_progress.py", "on_train_batch_end")
        + cum("progress/tqdm_progress.py", "on_train_batch_start"),
        "  of which checkpoint saves": cum("lightning/pytorch/trainer/trainer.py", "save_checkpoint"),
        "logger connector at batch end": cum("logger_connector.py", "on_batch_end")
        + cum("logger_connector.py", "update_train_step_metrics"),
    }
    print(f"\nOne training step, {1000 * loop / s['steps']:.2f} ms (cumulative, profiler overhead included):")
    for label, sec in parts.items():
        print(f"  {label:<60} {1000 * sec / s['steps']:>6.3f} ms")
    rest = loop - sum(v for k, v in parts.items() if not k.startswith("  "))
    print(f"  {'the rest: the loop machinery, hooks on the module, progress tracking':<60} "
          f"{1000 * rest / s['steps']:>6.3f} ms")
    print("\nLightning functions by own time (top 15):")
    stats.sort_stats("tottime").print_stats(r"lightning", 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", type=Path, default=ROOT / "data" / "names.txt", help="makemore's names.txt")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per figure (median) or rounds (best)")
    parser.add_argument("--lean", action="store_true", help="in-process steps/s of a lean Trainer against the plain loop")
    parser.add_argument("--quick", action="store_true", help="with --lean: a third of the steps")
    parser.add_argument("--profile", action="store_true", help="profile the shipped seed config in this process")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a busy "
                        "machine 1 avoids idle threads spinning against other processes")
    parser.add_argument("--flags", default="", help="extra flags for every microgpt fit, e.g. to measure a lever")
    parser.add_argument("--seed-only", action="store_true", help="only the seed model's marginal step")
    parser.add_argument("--interleaved", action="store_true", help="rows (2, 3), the plain loop run between "
                        "blocks of the shipped config's steps in the same fresh process")
    parser.add_argument("--interleaved-round", help=argparse.SUPPRESS)
    parser.add_argument("--plain-script", action="store_true", help=argparse.SUPPRESS)
    for flag, default in [("steps", 500), ("batch_size", 1), ("n_embd", 16), ("n_layer", 1), ("block_size", 8)]:
        parser.add_argument(f"--{flag}", type=int, default=default, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.names.resolve()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the end-to-end subprocesses
    if args.plain_script:
        return plain_script(names, args.steps, args.batch_size, args.n_embd, args.n_layer, args.block_size)
    if args.profile:
        return profile_lightning(names)
    if args.interleaved_round:
        return interleaved_round(names, args.interleaved_round)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.lean:
        return throughput(names, args.rounds, 1 / 3 if args.quick else 1.0)
    if args.interleaved:
        return interleaved(names, args.rounds)
    goals(names, args.rounds, args.flags.split(), "seed" if args.seed_only else "all")


if __name__ == "__main__":
    main()
