"""The model in plain PyTorch: the GPT, drawing names from it, and the character vocabulary. No Lightning here."""

from microgpt.model.gpt import GPT, Ensemble
from microgpt.model.tokenizer import CharTokenizer

__all__ = ["GPT", "CharTokenizer", "Ensemble"]
