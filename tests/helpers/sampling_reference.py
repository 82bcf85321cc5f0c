"""Names drawn by hand from a checkpoint's weights, apart from microgpt's own sampling code (``generate``,
``sample_names``): the reference for the tests of the commands that sample."""

from pathlib import Path

import torch
import torch.nn.functional as F

from microgpt.model.gpt import GPT


def drawn_by_hand(ckpt: Path, num_samples: int, temperature: float = 0.5, top_k: int | None = None, prefix: str = "",
                  seed: int = 0) -> list[str]:
    """Names drawn here from the checkpoint's weights as the sampling commands describe their draw: all names at
    once, one ``torch.multinomial`` over every row per new character (the model's full forward pass over the
    last block_size characters, no cache), among the ``top_k`` likeliest if given, until every name has ended or
    block_size characters were added."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    sizes = state["hyper_parameters"]
    vocab = sizes["vocab"]
    bos, block = len(vocab), sizes["block_size"]
    gpt = GPT(vocab_size=len(vocab) + 1, n_embd=sizes["n_embd"], n_head=sizes["n_head"], n_layer=sizes["n_layer"],
              block_size=block).eval()
    gpt.load_state_dict({k.removeprefix("gpt."): v for k, v in state["state_dict"].items()})
    generator = torch.Generator().manual_seed(seed)
    rows = [[bos, *(vocab.index(c) for c in prefix)] for _ in range(num_samples)]
    new = [[] for _ in range(num_samples)]
    with torch.no_grad():
        for _ in range(block):
            logits = gpt(torch.tensor([row[-block:] for row in rows]))[:, -1] / temperature
            if top_k is not None:
                outside = torch.ones_like(logits, dtype=torch.bool).scatter(1, logits.topk(top_k).indices, False)
                logits = logits.masked_fill(outside, float("-inf"))
            probs = F.softmax(logits, -1)
            for row, added, token in zip(rows, new, torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()):
                row.append(token)
                added.append(token)
            if all(bos in added for added in new):
                break
    ends = [added.index(bos) if bos in added else len(added) for added in new]
    return [prefix + "".join(vocab[t] for t in added[:end]) for added, end in zip(new, ends)]
