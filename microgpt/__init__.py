"""microgpt: a small, exact character-level GPT for names, trained with PyTorch Lightning.

The folders follow the architecture:

* ``model/``: the GPT, its sampling and the tokenizer, plain PyTorch (no Lightning);
* ``data/``: the names file, its token store, the split, rows, batches and the ``LightningDataModule``;
* ``training/``: the ``LightningModule``, the optimizers and the loss bookkeeping;
* ``callbacks/``: the recipes' callbacks;
* ``checkpoints/``: checkpoint files, run folders and loading a model back;
* ``commands/``: the command line (LightningCLI), ``sample`` and ``serve``.
"""

import importlib

_EXPORTS = {"GPT": "model.gpt", "CharTokenizer": "model.tokenizer", "NamesDataModule": "data.datamodule",
            "MicroGPT": "training.module"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"microgpt.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'microgpt' has no attribute {name!r}")
