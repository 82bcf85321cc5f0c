"""The character vocabulary: characters to ids and back, with one id that starts and ends every name."""

from __future__ import annotations

from microgpt.errors import UserError


class CharTokenizer:
    """Maps characters to ids ``0..len(chars)-1``; id ``len(chars)`` is BOS, which starts and ends every name."""

    def __init__(self, chars: str):
        self.chars = chars
        self.bos = len(chars)
        self.vocab_size = len(chars) + 1
        self._ids = {c: i for i, c in enumerate(chars)}

    def unknown(self, text: str) -> list[str]:
        """The characters of ``text`` outside the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str) -> list[int]:
        """The ids of the characters of ``text`` (no BOS added)."""
        missing = self.unknown(text)
        if missing:
            raise UserError(f"characters not in the model's vocabulary: {''.join(missing)!r}.")
        return [self._ids[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; BOS is dropped."""
        return "".join(self.chars[i] for i in ids if i != self.bos)
