"""A trained GPT and its vocabulary from a microgpt checkpoint file. Torch only: no Lightning here.

``load_model`` rebuilds one model from a checkpoint alone (its sizes and vocabulary are inside);
``load_members`` loads the other models of an ensemble, checked to fit the first one.
"""

from __future__ import annotations

import inspect
import os

import torch

from microgpt.checkpoints.io import load_checkpoint
from microgpt.errors import UserError
from microgpt.model.gpt import GPT
from microgpt.model.tokenizer import CharTokenizer


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The GPT and its vocabulary from a microgpt checkpoint (read with ``weights_only=True`` onto the CPU,
    whatever device it was saved from), then moved to ``device``."""
    checkpoint = load_checkpoint(path, "cpu")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "vocab" not in hparams:
        raise UserError(f"{path}: not a microgpt checkpoint (no vocabulary inside).")
    tokenizer = CharTokenizer(hparams["vocab"])
    sizes = {k: hparams[k] for k in inspect.signature(GPT).parameters if k in hparams}
    gpt = GPT(tokenizer.vocab_size, **sizes)
    weights = {k.removeprefix("gpt."): v for k, v in checkpoint["state_dict"].items() if k.startswith("gpt.")}
    try:
        gpt.load_state_dict(weights)
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit the model its settings describe.") from None
    return gpt.to(device), tokenizer


def load_members(paths: list[str], tokenizer: CharTokenizer, block_size: int,
                 device: str | torch.device = "cpu") -> list[GPT]:
    """The GPTs of the checkpoints at ``paths`` on ``device``, in eval mode, checked to share ``tokenizer``'s
    vocabulary and ``block_size``, so that their predictions can be averaged with a model that has them."""
    members = []
    for path in paths:
        gpt, other = load_model(path, device)
        if other.chars != tokenizer.chars:
            raise UserError(f"{path}: its vocabulary {other.chars!r} differs from the first model's "
                            f"{tokenizer.chars!r}, so their predictions cannot be averaged.")
        if gpt.block_size != block_size:
            raise UserError(f"{path}: its context length is {gpt.block_size}, the first model's is {block_size}.")
        members.append(gpt.eval())
    return members
