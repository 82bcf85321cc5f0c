"""The ``sample`` command: names from a checkpoint alone, with torch only.

``python -m microgpt sample --ckpt_path K [K ...] [--num_samples N] [--temperature T] [--top_k K] [--top_p P]
[--prefix P] [--min_length A] [--max_length B] [--only_new] [--unique] [--likeliest N] [--show_logprob] [--seed S]
[--output FILE]``. The checkpoint alone is enough: the vocabulary and sizes are inside it.
Several checkpoints sample from the average of their predicted probabilities. Nothing here imports
Lightning, so the command starts about as fast as torch itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from microgpt.checkpoints.io import resolve_checkpoint
from microgpt.checkpoints.loading import load_members, load_model
from microgpt.commands.devices import device_problem
from microgpt.data.known import KnownNames
from microgpt.errors import OneLineParser, UserError, exit_on_user_error
from microgpt.files import WriteFailed, atomic_write
from microgpt.model.gpt import Ensemble
from microgpt.model.names import NameOptions, format_names, invent
from microgpt.threads import use_threads


def resolve(path: str, root: str, prog: str = "microgpt sample") -> str:
    """``path``, or for ``last`` / ``best`` the newest run's checkpoint of that name under ``root``."""
    return resolve_checkpoint(path, root, "--root_dir", prog)


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
    parser = OneLineParser(prog="microgpt sample", description="Invent names with a trained checkpoint.")
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
    parser.add_argument("--min_length", type=positive_int, default=None,
                        help="names have at least this many characters, the prefix included")
    parser.add_argument("--max_length", type=positive_int, default=None,
                        help="names have at most this many characters, the prefix included")
    parser.add_argument("--only_new", action="store_true",
                        help="only names that are neither training nor held-out names of the checkpoint's run")
    parser.add_argument("--unique", action="store_true", help="no name twice")
    parser.add_argument("--likeliest", type=positive_int, default=None, metavar="N",
                        help="print the N most probable names instead of drawing (by the model's own probabilities), "
                             "as name<TAB>log-probability, most probable first")
    parser.add_argument("--show_logprob", action="store_true",
                        help="print each name as name<TAB>log-probability (natural log, given the prefix)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible names")
    parser.add_argument("--output", default=None, help="write the names to this file instead of printing them")
    parser.add_argument("--device", default="cpu",
                        help="torch device to sample on, e.g. cuda or cuda:1: the checkpoint is read on the CPU, "
                             "then the model is moved there (default cpu)")
    with exit_on_user_error("microgpt sample"):
        args = parser.parse_args(argv)
        if problem := device_problem(args.device):
            raise UserError(f"--device {args.device}: {problem}.")
        paths = [resolve(path, args.root_dir) for path in args.ckpt_path]
        gpt, tokenizer = load_model(paths[0], args.device)
        if len(paths) > 1:
            gpt = Ensemble([gpt, *load_members(paths[1:], tokenizer, gpt.block_size, args.device)])
        print(use_threads(args.num_samples, gpt), file=sys.stderr)  # a step draws one character of every name
        known = KnownNames.from_file(paths[0]) if args.only_new else None
        options = NameOptions(args.num_samples, args.prefix, args.temperature, args.top_k, args.top_p,
                              args.min_length, args.max_length, args.only_new, args.unique, args.likeliest)
        generator = None if args.seed is None else torch.Generator(args.device).manual_seed(args.seed)
        found = invent(gpt, tokenizer, options, generator, known, flag="--")
        text = format_names(found, args.show_logprob or args.likeliest is not None)
        if args.output:
            write_output(Path(args.output), text)
        else:
            sys.stdout.write(text)
        if found.shortfall:
            raise UserError(found.shortfall)
