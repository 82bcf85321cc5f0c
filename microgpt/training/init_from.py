"""The start of a new run from a trained checkpoint's weights (``--model.init_from``, fine-tuning). Torch only.

The checkpoint's sizes must equal the new model's; the vocabulary becomes the union of its characters and the
data's, and every character it knows keeps its learned rows, while new characters start fresh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from microgpt.checkpoints.loading import load_model
from microgpt.errors import UserError
from microgpt.model.gpt import GPT
from microgpt.model.tokenizer import CharTokenizer


@dataclass
class StartModel:
    """A trained GPT a new run starts from.

    Args:
        path: The checkpoint file it was read from.
        gpt: Its model.
        tokenizer: Its vocabulary.
    """

    path: str
    gpt: GPT
    tokenizer: CharTokenizer

    @classmethod
    def load(cls, path: str, **sizes: int) -> StartModel:
        """The model of the checkpoint at ``path``, refused (naming every size that differs) unless its sizes
        are ``sizes``. Loading it draws none of the random numbers the new run's own weights use."""
        with torch.random.fork_rng(devices=[]):
            try:
                gpt, tokenizer = load_model(path)
            except UserError as err:
                raise UserError(f"--model.init_from {err}") from None
        start = cls(path, gpt, tokenizer)
        start.check_sizes(**sizes)
        return start

    def check_sizes(self, **sizes: int) -> None:
        """Refuse, naming every size that differs, a start model whose sizes are not ``sizes``."""
        gpt = self.gpt
        theirs = {"n_embd": gpt.wte.embedding_dim, "n_head": gpt.blocks[0].attn.n_head,
                  "n_layer": len(gpt.blocks), "block_size": gpt.block_size}
        differ = [name for name, value in sizes.items() if theirs[name] != value]
        if differ:
            raise UserError(
                f"--model.init_from {self.path}: the checkpoint's model has "
                + ", ".join(f"{name} {theirs[name]}" for name in differ) + "; this run's has "
                + ", ".join(f"{name} {sizes[name]}" for name in differ)
                + " (pass the sizes it was trained with, e.g. its --config)."
            )

    def vocabulary_with(self, vocab: str) -> CharTokenizer:
        """The union of the start model's characters and ``vocab``'s, sorted."""
        return CharTokenizer("".join(sorted(set(self.tokenizer.chars) | set(vocab))))

    @torch.no_grad()
    def copy_into(self, target: GPT, target_tokenizer: CharTokenizer) -> None:
        """Load the start model's weights into ``target``, whose vocabulary holds all of the start model's:
        every token's embedding and output rows move to its id in ``target`` (BOS to BOS); rows of the new
        characters keep ``target``'s own, freshly drawn values."""
        rows = torch.tensor([*target_tokenizer.encode(self.tokenizer.chars), target_tokenizer.bos])
        weights = self.gpt.state_dict()
        for name in ("wte.weight", "lm_head.weight"):
            moved = target.state_dict()[name].clone()
            moved[rows] = weights[name]
            weights[name] = moved
        target.load_state_dict(weights)
