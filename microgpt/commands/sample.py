"""Inventing names, and the ``sample`` command that does it from a checkpoint alone, with torch only.

``python -m microgpt sample --ckpt_path K [K ...] [--num_samples N] [--temperature T] [--top_k K] [--top_p P]
[--prefix P] [--seed S] [--output FILE]``. The checkpoint alone is enough: the vocabulary and sizes are inside it.
Several checkpoints sample from the average of their predicted probabilities. Nothing here imports
Lightning, so the command starts about as fast as torch itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from microgpt.checkpoints.io import find_checkpoint
from microgpt.commands.devices import device_problem
from microgpt.errors import UserError
from microgpt.files import WriteFailed, atomic_write
from microgpt.checkpoints.loading import load_members, load_model
from microgpt.model.gpt import GPT, Ensemble, sampling_problem
from microgpt.model.tokenizer import CharTokenizer
from microgpt.threads import use_threads


def sample_names(gpt: GPT | Ensemble, tokenizer: CharTokenizer, num_samples: int, temperature: float = 0.5,
                 top_k: int | None = None, prefix: str = "", generator: torch.Generator | None = None,
                 top_p: float | None = None) -> list[str]:
    """``num_samples`` names starting with ``prefix``, drawn in parallel (``gpt`` in eval mode for the draw);
    ``top_p`` keeps only the smallest set of likeliest characters whose probability reaches it."""
    if problem := sampling_problem(temperature, top_k, top_p):
        raise UserError(problem)
    unknown = tokenizer.unknown(prefix)
    if unknown:
        raise UserError(f"the prefix {prefix!r} has characters the model has never seen: {''.join(unknown)!r}.")
    was_training = gpt.training
    gpt.eval()
    try:
        ids = gpt.generate([tokenizer.bos, *tokenizer.encode(prefix)], num_samples, tokenizer.bos,
                           temperature=temperature, top_k=top_k, generator=generator, top_p=top_p)
    finally:
        gpt.train(was_training)
    return [prefix + tokenizer.decode(s) for s in ids]


@torch.no_grad()
def score_names(gpt: GPT | Ensemble, tokenizer: CharTokenizer, names: list[str]) -> list[float]:
    """Each name's mean negative log-likelihood per predicted character (its end included), in nats,
    as ``test`` scores them: the model reads ``[BOS] + name`` cut to its context and predicts one step ahead."""
    rows = [[tokenizer.bos, *tokenizer.encode(name), tokenizer.bos][: gpt.block_size + 1] for name in names]
    width = max(len(row) for row in rows)
    device = next(gpt.parameters()).device
    tokens = torch.tensor([row + [tokenizer.bos] * (width - len(row)) for row in rows], device=device)
    lengths = torch.tensor([len(row) - 1 for row in rows], device=device)
    was_training = gpt.training
    gpt.eval()
    try:
        logits = gpt(tokens[:, :-1])
    finally:
        gpt.train(was_training)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    real = torch.arange(width - 1, device=device) < lengths[:, None]
    return ((nll * real).sum(1) / lengths).tolist()


def resolve(path: str, root: str) -> str:
    """``path``, or for ``last`` / ``best`` the newest run's checkpoint of that name under ``root``."""
    if path not in ("last", "best"):
        return path
    found = find_checkpoint(root, path)
    if found is None:
        raise UserError(f"--ckpt_path {path}: no {path}.ckpt under {Path(root).resolve()}; pass a file or --root_dir.")
    return str(found)


def write_output(path: Path, text: str) -> None:
    """``text`` into the file at ``path`` whole or not at all (written beside it, then renamed), or into a
    stream or device (``/dev/stdout``, a pipe) as it is; a failed write is one line."""
    try:
        if path.exists() and not path.is_file():
            with path.open("w", encoding="utf-8") as f:
                f.write(text)
            return
        atomic_write(path.resolve() if path.is_symlink() else path, lambda f: f.write(text.encode("utf-8")))
    except WriteFailed as err:
        raise UserError(f"{err}; nothing was written.") from None
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}.") from None


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="microgpt sample", description="Invent names with a trained checkpoint.")
    parser.add_argument("--ckpt_path", required=True, nargs="+",
                        help="checkpoint written by fit, or 'last' / 'best' for the newest run's under --root_dir; "
                             "several: average their predictions")
    parser.add_argument("--root_dir", default=".",
                        help="where --ckpt_path last / best look for runs, as fit's --trainer.default_root_dir (default .)")
    parser.add_argument("--num_samples", type=positive_int, default=20, help="how many names (default 20)")
    parser.add_argument("--temperature", type=positive_float, default=0.5, help="softmax temperature (default 0.5)")
    parser.add_argument("--top_k", type=positive_int, default=None, help="draw only among the k likeliest characters")
    parser.add_argument("--top_p", type=probability, default=None,
                        help="draw only among the fewest likeliest characters whose probability reaches p (0 < p <= 1)")
    parser.add_argument("--prefix", default="", help="every name starts with these characters")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible names")
    parser.add_argument("--output", default=None, help="write the names to this file instead of printing them")
    parser.add_argument("--device", default="cpu",
                        help="torch device to sample on, e.g. cuda or cuda:1: the checkpoint is read on the CPU, "
                             "then the model is moved there (default cpu)")
    args = parser.parse_args(argv)
    try:
        if problem := device_problem(args.device):
            raise UserError(f"--device {args.device}: {problem}.")
        paths = [resolve(path, args.root_dir) for path in args.ckpt_path]
        gpt, tokenizer = load_model(paths[0], args.device)
        if len(paths) > 1:
            gpt = Ensemble([gpt, *load_members(paths[1:], tokenizer, gpt.block_size, args.device)])
        print(use_threads(args.num_samples, gpt), file=sys.stderr)  # a step draws one character of every name
        generator = None if args.seed is None else torch.Generator(args.device).manual_seed(args.seed)
        names = sample_names(gpt, tokenizer, args.num_samples, args.temperature, args.top_k, args.prefix, generator,
                             args.top_p)
        text = "".join(f"{name}\n" for name in names)
        if args.output:
            write_output(Path(args.output), text)
        else:
            sys.stdout.write(text)
    except UserError as err:
        if os.environ.get("MICROGPT_DEBUG"):
            raise
        print(f"microgpt sample: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
