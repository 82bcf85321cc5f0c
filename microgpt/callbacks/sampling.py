"""Inventing names during and at the end of training, and how many of them are new."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch

from microgpt.errors import UserError
from microgpt.model.names import NameOptions, invent, options_problem
from microgpt.model.sampling import sampling_problem
from microgpt.training.steps import ends_optimizer_step


def novelty(names: list[str], train_names: set[str], held_out_names: set[str]) -> dict[str, float]:
    """Shares of ``names`` that are training names, held-out names (and not training ones), or new."""
    n = len(names)
    in_train = sum(name in train_names for name in names)
    in_held_out = sum(name in held_out_names and name not in train_names for name in names)
    return {"train": in_train / n, "held_out": in_held_out / n, "new": (n - in_train - in_held_out) / n}


class SampleNames(L.Callback):
    """Invent names with the model: at the end of training (printed, saved to samples.txt, logged), and
    every ``every_n_steps`` optimizer steps during training when set (logged). Only global rank 0 samples.

    Args:
        num_samples: How many names to generate each time.
        temperature: Softmax temperature, positive; lower is more conservative.
        top_k: Draw only among the k most likely characters; all when unset.
        prefix: Every name starts with these characters.
        every_n_steps: Also sample every this many optimizer steps during training; 0 turns it off.
        seed: Seed of the names' random draws. Unset, the end-of-training names continue torch's global
            random state, as the seed script does; rounds during training always use their own generator
            (seeded with seed + step), so watching never changes the training.
        top_p: Draw only among the fewest likeliest characters whose probability reaches this, in (0, 1];
            all when unset.
        min_length: Names have at least this many characters, the prefix included.
        max_length: Names have at most this many characters, the prefix included.
        unique: No name twice in a round.
        only_new: Only names that are neither training nor held-out names (of the data module's split).
    """

    def __init__(self, num_samples: int = 20, temperature: float = 0.5, top_k: int | None = None, prefix: str = "",
                 every_n_steps: int = 0, seed: int | None = None, top_p: float | None = None,
                 min_length: int | None = None, max_length: int | None = None, unique: bool = False,
                 only_new: bool = False):
        if num_samples < 1:
            raise UserError(f"num_samples must be a positive integer, got {num_samples}.")
        if problem := sampling_problem(temperature, top_k, top_p):
            raise UserError(problem)
        if every_n_steps < 0:
            raise UserError(f"every_n_steps must be zero or more, got {every_n_steps}.")
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.prefix = prefix
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.options = NameOptions(num_samples, prefix, temperature, top_k, top_p, min_length, max_length, only_new,
                                   unique)
        self.known = None  # the data's names, for only_new (set up with the trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the settings against the model (its vocabulary and context) before training, not after it."""
        if self.options.only_new:
            self.known = getattr(trainer.datamodule, "known", None)
        if problem := options_problem(self.options, pl_module.tokenizer, pl_module.gpt.block_size, self.known, ""):
            raise UserError(problem[1])

    def sample(self, pl_module: L.LightningModule, generator: torch.Generator | None) -> list[str]:
        found = invent(pl_module.predictor, pl_module.tokenizer, self.options, generator, self.known)
        if found.shortfall:
            print(f"samples: {found.shortfall}")
        return found.names

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or not ends_optimizer_step(trainer, batch_idx):
            return  # not a sampling step, or a micro-batch that did not end this optimizer step
        if trainer.is_global_zero:
            generator = torch.Generator(pl_module.device).manual_seed((self.seed or 0) + step)
            log_samples(trainer, self.sample(pl_module, generator), step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every process must ask, or rank 0 waits forever
        if not trainer.is_global_zero:
            return
        generator = None if self.seed is None else torch.Generator(pl_module.device).manual_seed(self.seed)
        names = self.sample(pl_module, generator)
        print("\n".join(f"sample {i:2d}: {name}" for i, name in enumerate(names, 1)))
        if log_dir is not None:
            path = Path(log_dir) / "samples.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(names) + "\n", encoding="utf-8")
        log_samples(trainer, names, trainer.global_step)
        shares = report_novelty(trainer, names, "samples")
        if shares is not None:
            for logger in trainer.loggers:
                logger.log_metrics({f"samples/{k}": v for k, v in shares.items()}, step=trainer.global_step)


def report_novelty(trainer: L.Trainer, names: list[str], what: str) -> dict[str, float] | None:
    """Print which shares of ``names`` (or of lines ``name<TAB>log-probability``) are training names, held-out
    names or new, and return them (None when the data module does not know its names)."""
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "known_names"):
        return None
    names = [name.split("\t")[0] for name in names]  # lines of name<TAB>log-probability count as their names
    shares = novelty(names, *datamodule.known_names(names))
    print(f"{what}: {shares['new']:.0%} new, {shares['train']:.0%} training names, "
          f"{shares['held_out']:.0%} held-out names")
    return shares


def log_samples(trainer: L.Trainer, names: list[str], step: int) -> None:
    """Record a round of names with every logger: TensorBoard text, a ``samples.csv`` beside a CSV log, or ``log_text``."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_text"):
            logger.log_text(key="samples", columns=["step", "name"], data=[[step, n] for n in names], step=step)
        elif hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text("samples", "\n\n".join(names), step)
        elif getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / "samples.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            new_file = not path.exists()
            with path.open("a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if new_file:
                    writer.writerow(["step", "name"])
                writer.writerows([step, n] for n in names)
