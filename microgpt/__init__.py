"""microgpt: a small, exact character-level GPT for names, trained with PyTorch Lightning.

``microgpt.model`` is plain PyTorch; importing it does not import Lightning.
"""

import importlib

_EXPORTS = {"GPT": "model", "CharTokenizer": "tokenizer", "NamesDataModule": "data", "MicroGPT": "module"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"microgpt.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'microgpt' has no attribute {name!r}")
