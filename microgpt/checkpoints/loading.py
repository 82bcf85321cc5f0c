"""A trained GPT and its vocabulary from a microgpt checkpoint file. Torch only: no Lightning here.

``load_model`` rebuilds one model from a checkpoint alone (its sizes and vocabulary are inside), or from a folder
``microgpt export --format safetensors`` wrote (``config.json`` and ``model.safetensors``: nothing is unpickled);
``load_members`` loads the other models of an ensemble, checked to fit the first one.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch

from microgpt.checkpoints.io import load_checkpoint
from microgpt.errors import UserError
from microgpt.model.gpt import GPT
from microgpt.model.tokenizer import CharTokenizer

CONFIG, WEIGHTS = "config.json", "model.safetensors"  # an exported folder's files


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The GPT and its vocabulary from a microgpt checkpoint (read with ``weights_only=True`` onto the CPU,
    whatever device it was saved from) or an exported folder, then moved to ``device``."""
    if Path(path).is_dir():
        return load_exported(Path(path), device)
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


def load_exported(folder: Path, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The GPT and its vocabulary from the ``config.json`` and ``model.safetensors`` of an exported folder."""
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder}: is a folder without {CONFIG} and {WEIGHTS}; pass a checkpoint file or a "
                        "folder written by microgpt export --format safetensors.")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ModuleNotFoundError:
        raise UserError(f"{folder}: reading an exported folder needs safetensors: pip install safetensors.") from None
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        chars = "".join(config["vocab"])
        if config["bos_id"] != len(chars):
            raise ValueError("bos_id")
        sizes = {k: config[k] for k in inspect.signature(GPT).parameters if k in config and k != "vocab_size"}
        gpt = GPT(len(chars) + 1, **sizes)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder / CONFIG}: is damaged (not the vocabulary and sizes export writes).") from None
    try:
        weights = load_file(folder / WEIGHTS, device="cpu")
    except (OSError, SafetensorError) as err:
        raise UserError(f"{folder / WEIGHTS}: is damaged ({str(err).splitlines()[0]}).") from None
    try:
        gpt.load_state_dict(weights)
    except RuntimeError:
        raise UserError(f"{folder}: its weights do not fit the model its config.json describes.") from None
    return gpt.to(device), CharTokenizer(chars)


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
