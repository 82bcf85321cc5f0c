"""Batches of name rows: padded (one name per row) or packed (several per row), and the loaders that
walk the training stream and the held-out names in them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset

from microgpt.data.rows import IGNORE_INDEX, NameRows


class Batch(NamedTuple):
    """Rows of token ids and the ids they predict. ``positions`` is set for packed rows (several names per
    row, each restarting at position 0). A training batch also carries, as host integers, the number of
    target tokens of its whole global batch (``tokens``) and of every micro-batch of its optimizer step
    (``step_tokens``), over all processes: the loss's denominator is known without waiting for any device."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    tokens: int = 0
    step_tokens: int = 0


def padded_batch(rows: NameRows, idx: torch.Tensor, trim: bool = True) -> Batch:
    """The names at ``idx``, one per row, trimmed to the batch's longest name (or, without ``trim``,
    ``block_size`` wide)."""
    cut = rows.cut(idx)
    if not trim:
        return Batch(cut["inputs"], cut["targets"])
    T = int(cut["lengths"].max())
    return Batch(cut["inputs"][:, :T], cut["targets"][:, :T])


def first_fit(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) of each item when items are placed, longest first, into the first row with room."""
    free: list[int] = []
    place = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(capacity)
        place[i] = (row, capacity - free[row])
        free[row] -= lengths[i]
    return place


def packed_batch(rows: NameRows, idx: torch.Tensor) -> Batch:
    """The names at ``idx`` laid end to end (``first_fit``) in rows of ``block_size`` tokens. ``positions``
    restarts at 0 with every name, which is how the model tells the names of a row apart; slots left over
    at the end of a row hold token 0 at position 0 and no target."""
    cut = rows.cut(idx)
    lengths = cut["lengths"]
    width = rows.block_size
    place = torch.tensor(first_fit(lengths.tolist(), width), dtype=torch.long)
    row, offsets = place.unbind(1)
    num_rows = int(row.max()) + 1
    first = torch.cumsum(lengths, 0) - lengths  # where each name starts in the flat list of tokens
    within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(first, lengths)
    slots = torch.repeat_interleave(row * width + offsets, lengths) + within
    real = torch.arange(width) < lengths[:, None]  # (N, width): the name's own tokens, in order
    inputs = torch.zeros(num_rows * width, dtype=torch.long)
    targets = torch.full((num_rows * width,), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(num_rows * width, dtype=torch.long)
    inputs[slots] = cut["inputs"][real]
    targets[slots] = cut["targets"][real]
    positions[slots] = within
    return Batch(inputs.view(num_rows, width), targets.view(num_rows, width), positions.view(num_rows, width))


def packed_row_count(rows: NameRows, idx: torch.Tensor) -> int:
    """How many rows ``packed_batch`` lays the names at ``idx`` in."""
    return max(row for row, _ in first_fit(rows.target_counts(idx).tolist(), rows.block_size)) + 1


def with_empty_rows(batch: Batch, multiple: int) -> Batch:
    """A packed batch with empty rows (token 0 at position 0, no target) added up to a multiple of ``multiple`` rows."""
    missing = -batch.inputs.size(0) % multiple
    if not missing:
        return batch
    width = batch.inputs.size(1)
    return Batch(torch.cat([batch.inputs, batch.inputs.new_zeros(missing, width)]),
                 torch.cat([batch.targets, batch.targets.new_full((missing, width), IGNORE_INDEX)]),
                 torch.cat([batch.positions, batch.positions.new_zeros(missing, width)]))


class TrainBatches(IterableDataset):
    """An endless stream of names in a fixed order, cut into numbered global batches.

    Global batch ``k`` holds stream places ``k*B .. k*B+B-1``; place ``p`` is name ``p % N`` of pass
    ``p // N`` over the names (every pass in the given order, or reshuffled per pass when ``shuffle`` is
    set). A process of rank ``r`` out of ``W`` gets the ``r``-th of ``W`` equal slices of every global
    batch. Epoch ``e`` is global batches ``e*P .. e*P+P-1`` (``P = len(self)``), and an optimizer step
    takes ``accumulate`` of them, or the epoch's last few, as Lightning steps. Iterating yields the
    batches of epoch ``current_epoch()`` not yet yielded, as ``Batch``es of padded rows (``padded_batch``)
    or, with ``packed``, of packed rows (``packed_batch``). How far into which epoch the stream is, is the
    state Lightning saves in a checkpoint and restores on resume (``state_dict``), so a resumed run goes
    on with the very next batch. With ``static``, every batch has one shape, so that a compiled step
    compiles once: padded rows are ``block_size`` wide, and packed batches get empty rows up to a multiple
    of ``row_multiple``, the most rows the first pass's batches need. With ``repeat`` (Lightning's
    ``--trainer.overfit_batches``, which cuts every epoch short), every epoch is epoch 0's batches again.
    """

    def __init__(self, rows: NameRows, batch_size: int, current_epoch: Callable[[], int] = lambda: 0,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1, packed: bool = False,
                 accumulate: int = 1, static: bool = False, repeat: bool = False):
        self.rows = rows
        self.repeat = repeat
        self.static = static
        self.packed = packed
        self.num_names = len(rows)
        self.batch_size = batch_size
        self.current_epoch = current_epoch
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.accumulate = accumulate
        self.batches_per_epoch = math.ceil(self.num_names / batch_size)
        self.done = (0, 0)  # (an epoch, how many of its batches have been yielded)
        self._step_tokens = (range(0), 0)  # (the global batches of an optimizer step, their target tokens)
        self._permutation: tuple[int | None, torch.Tensor | None] = (None, None)  # (a pass, its order)
        # static packed batches: the most rows any batch of the first pass needs (of its first 1000 batches);
        # a rare later batch that needs more is padded to twice as many, and a compiled step compiles once more
        self.row_multiple = (self.most_packed_rows(range(min(self.batches_per_epoch, 1000)))
                             if static and packed else 1)

    def __len__(self) -> int:
        """Batches in a whole epoch, also when resuming mid-epoch: Lightning counts the ones already done,
        and iterating then yields only the rest."""
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the epoch and how many of its batches have been yielded."""
        return {"epoch": self.done[0], "batches_done": self.done[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = (int(state["epoch"]), int(state["batches_done"]))

    def global_names(self, k: int) -> torch.Tensor:
        """The name indices of global batch ``k``, all processes' slices in rank order."""
        p = torch.arange(k * self.batch_size, (k + 1) * self.batch_size)
        idx = p % self.num_names
        if self.shuffle:
            passes = p // self.num_names
            for n in passes.unique().tolist():
                idx[passes == n] = self.permutation(n)[idx[passes == n]]
        return idx

    def permutation(self, n: int) -> torch.Tensor:
        """The order of pass ``n`` over the names when shuffling (the latest one is cached)."""
        if self._permutation[0] != n:
            generator = torch.Generator().manual_seed(self.seed + n)
            self._permutation = (n, torch.randperm(self.num_names, generator=generator))
        return self._permutation[1]

    def tokens(self, k: int) -> int:
        """Target tokens in global batch ``k``, over all processes."""
        return int(self.rows.target_counts(self.global_names(k)).sum())

    def step_batches(self, k: int) -> range:
        """The global batches of the optimizer step that global batch ``k`` belongs to."""
        epoch_start = k // self.batches_per_epoch * self.batches_per_epoch
        first = epoch_start + (k - epoch_start) // self.accumulate * self.accumulate
        return range(first, min(first + self.accumulate, epoch_start + self.batches_per_epoch))

    def step_tokens(self, k: int, tokens: int) -> int:
        """Target tokens in all the micro-batches of global batch ``k``'s optimizer step (``tokens`` are k's own)."""
        if self.accumulate == 1:
            return tokens
        batches, total = self._step_tokens
        if k not in batches:
            batches = self.step_batches(k)
            total = sum(tokens if j == k else self.tokens(j) for j in batches)
            self._step_tokens = (batches, total)
        return total

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.current_epoch()
        start = self.done[1] if self.done[0] == epoch else 0
        for i in range(start, self.batches_per_epoch):
            k = (0 if self.repeat else epoch) * self.batches_per_epoch + i
            names = self.global_names(k)
            tokens = int(self.rows.target_counts(names).sum())
            mine = self.own_slice(names)
            if self.packed:
                batch = packed_batch(self.rows, mine)
                batch = with_empty_rows(batch, self.row_multiple) if self.static else batch
            else:
                batch = padded_batch(self.rows, mine, trim=not self.static)
            self.done = (epoch, i + 1)
            yield batch._replace(tokens=tokens, step_tokens=self.step_tokens(k, tokens))

    def own_slice(self, names: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global batch's names."""
        per_rank = self.batch_size // self.world_size
        return names[self.rank * per_rank : (self.rank + 1) * per_rank]

    def most_packed_rows(self, batches: range) -> int:
        """The most rows that this process's slice of any of global ``batches`` is packed in."""
        return max(packed_row_count(self.rows, self.own_slice(self.global_names(k))) for k in batches)


class EvalBatches(IterableDataset):
    """Every name once, in batches; a process of rank ``r`` out of ``W`` scores names ``r, r+W, ...``.
    A process that gets no names yields one empty batch, so that every process takes part in the
    evaluation's end (where the metrics are summed over processes)."""

    def __init__(self, rows: NameRows, batch_size: int, rank: int = 0, world_size: int = 1):
        self.rows = rows
        self.indices = torch.arange(rank, len(rows), world_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.indices) / self.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        if not len(self.indices):
            yield Batch(torch.zeros(0, 1, dtype=torch.long), torch.full((0, 1), IGNORE_INDEX, dtype=torch.long))
        for idx in self.indices.split(self.batch_size):
            yield padded_batch(self.rows, idx)
