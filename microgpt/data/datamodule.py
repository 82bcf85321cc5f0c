"""The names data as Lightning sees it: the LightningDataModule, and the sampling requests of ``predict``.

A name becomes ``[BOS] + characters + [BOS]`` cut to ``block_size + 1`` tokens (``microgpt.data.rows``). The
file is encoded once into a memory-mapped token store (``microgpt.data.store``) and split by a seeded shuffle
(``microgpt.data.split``); batches are cut from it by index, one name per row, right-padded to the batch's
longest name, or with ``pack`` several names per row of ``block_size`` tokens (``microgpt.data.batches``).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import lightning as L
import numpy as np
import torch

from microgpt.data.batches import EvalBatches, TrainBatches
from microgpt.data.known import STATE_KEY, KnownNames
from microgpt.data.split import NamesSplit
from microgpt.data.store import default_cache_dir
from microgpt.errors import UserError
from microgpt.model.names import NameOptions, options_problem
from microgpt.model.tokenizer import CharTokenizer

# makemore's names.txt (32,033 names, MIT licence; see NOTICE), shipped inside the package
BUNDLED_NAMES = Path(str(files("microgpt.data") / "names.txt"))


class PredictRequests:
    """Sampling requests for ``predict``: this process's share of ``total`` names, in chunks of at most
    ``chunk``, each with a seed of its own drawn from ``seed``, the process's rank and the chunk's number (with
    ``unique`` or ``likeliest``, one request of all of them, on rank 0).
    Every process gets at least one request (of 0 names, when there are more processes than names), so that
    all of them reach the end of prediction, where the names are gathered."""

    def __init__(self, total: int, chunk: int, request: dict, seed: int, rank: int = 0, world_size: int = 1):
        if request.get("unique") or request.get("likeliest"):  # one request, so that no name comes twice
            total, chunk, world_size = total * (rank == 0), max(total, 1), 1
        share = total // world_size + (rank < total % world_size)
        counts = [min(chunk, share - i) for i in range(0, share, chunk)] or [0]
        self.requests = [{**request, "count": n, "seed": chunk_seed(seed, rank, i)} for i, n in enumerate(counts)]

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.requests)


def chunk_seed(seed: int, rank: int, chunk: int) -> int:
    """A seed for chunk ``chunk`` of process ``rank``'s names, well apart from every other (seed, rank, chunk)."""
    return int(np.random.SeedSequence([seed % 2**63, rank, chunk]).generate_state(1, np.uint64)[0] >> 1)


class NamesDataModule(L.LightningDataModule):
    """Names, one per line, split into training and held-out validation names.

    Args:
        path: UTF-8 text file with one name per line; unset, makemore's names.txt that ships with microgpt.
        block_size: Context length; set it with --model.block_size, which is linked here.
        batch_size: Names per batch, summed over all devices (an optimizer step takes accumulate_grad_batches batches).
        val_size: Number of names held out for validation: the last ones after the seeded shuffle (before any test names).
        test_size: Number of names held out for testing, the very last ones; 0 tests on the validation names.
        test_path: A separate file of names to test on instead of the held-out split.
        shuffle: Reshuffle the training names at every pass instead of keeping the seed's order.
        pack: Lay training names end to end in rows of block_size tokens, each name attending only to
            itself: the same loss and gradients as one padded row per name, with far fewer padded positions.
        predict_size: How many names the predict command invents.
        predict_prefix: Names invented by predict start with these characters.
        predict_temperature: Softmax temperature of predict's draws, positive.
        predict_top_k: Predict draws only among the k most likely characters; all when unset.
        predict_top_p: Predict draws only among the fewest likeliest characters whose probability reaches
            this, in (0, 1]; all when unset.
        predict_min_length: Names invented by predict have at least this many characters, the prefix included.
        predict_max_length: Names invented by predict have at most this many characters, the prefix included.
        predict_only_new: Predict invents only names that are neither training nor held-out names of the run
            that made the checkpoint.
        predict_unique: Predict invents no name twice.
        predict_likeliest: Predict writes this many of the most probable names instead of drawn ones, with
            their log-probabilities.
        predict_show_logprob: Predict writes each name as name<TAB>log-probability (natural log, given the prefix).
        seed: Seed of the one-time shuffle that fixes the split and the training order.
        eval_batch_size: Names per batch when scoring held-out names.
        static_shapes: Give every training batch one shape, so that a compiled training step compiles once:
            padded rows block_size wide, packed batches padded to a fixed number of rows; linked from --model.compile.
        cache_dir: Folder for the token stores that names files are encoded into once; unset, $MICROGPT_CACHE,
            else $XDG_CACHE_HOME/microgpt, else ~/.cache/microgpt.
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 8,
        batch_size: int = 1,
        val_size: int = 1000,
        test_size: int = 0,
        test_path: str | None = None,
        shuffle: bool = False,
        pack: bool = False,
        predict_size: int = 20,
        predict_prefix: str = "",
        predict_temperature: float = 0.5,
        predict_top_k: int | None = None,
        predict_top_p: float | None = None,
        predict_min_length: int | None = None,
        predict_max_length: int | None = None,
        predict_only_new: bool = False,
        predict_unique: bool = False,
        predict_likeliest: int | None = None,
        predict_show_logprob: bool = False,
        seed: int = 42,
        eval_batch_size: int = 500,
        static_shapes: bool = False,
        cache_dir: str | None = None,
    ):
        super().__init__()
        for name, value in [("block_size", block_size), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size)]:
            if value < 1:
                raise UserError(f"--data.{name} must be a positive integer, got {value}.")
        for name, value in [("val_size", val_size), ("test_size", test_size)]:
            if value < 0:
                raise UserError(f"--data.{name} must be zero or more, got {value}.")
        self.save_hyperparameters(ignore=["cache_dir"])  # a folder of this machine, not part of the recipe
        self.path = path or str(BUNDLED_NAMES)
        self.block_size = block_size
        self.batch_size = batch_size
        self.test_path = test_path
        self.shuffle = shuffle
        self.pack = pack
        self.predict_request = {"prefix": predict_prefix, "temperature": predict_temperature, "top_k": predict_top_k,
                                "top_p": predict_top_p, "min_length": predict_min_length,
                                "max_length": predict_max_length, "only_new": predict_only_new,
                                "unique": predict_unique, "likeliest": predict_likeliest,
                                "show_logprob": predict_show_logprob}
        self.predict_size = predict_likeliest or predict_size
        self.loaded_known: KnownNames | None = None  # the names stored in the checkpoint predict loads
        self._known: KnownNames | None = None
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.static_shapes = static_shapes
        self.rank, self.world_size = 0, 1  # set by setup
        self.predict_seed: int | None = None  # torch's seed, read by setup
        self.split = NamesSplit(self.path, Path(cache_dir) if cache_dir else default_cache_dir(), seed, val_size,
                                test_size, test_path)

    def prepare_data(self) -> None:
        """Build the token stores and the seeded order that are missing (once per node, by its first process)."""
        _ = self.split.store, self.split.order  # the properties build them and keep them
        if self.test_path and (self.trainer is None or self.trainer.testing):
            _ = self.split.test_store

    @property
    def tokenizer(self) -> CharTokenizer:
        """The character vocabulary of the whole file."""
        return self.split.tokenizer

    @property
    def vocab(self) -> str:
        """The vocabulary's characters in id order (linked to the model)."""
        return self.tokenizer.chars

    def known_names(self, names: list[str]) -> tuple[set[str], set[str]]:
        """Those of ``names`` that are training names, and those that are held-out (validation or test) names."""
        return self.split.known_names(names)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.rank, self.world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        # torch's seed as set by --seed_everything, read before a checkpoint's random state is restored
        self.predict_seed = torch.initial_seed()
        if stage == "fit" and self.batch_size % self.world_size:
            raise UserError(
                f"--data.batch_size {self.batch_size} cannot be split evenly over {self.world_size} processes."
            )
        # evaluate with the model's own vocabulary: a checkpoint's may differ from this file's
        model = trainer.lightning_module if trainer else None
        tokenizer = getattr(model, "tokenizer", self.tokenizer)
        if stage == "fit":
            self.split.warn_about_long_names(self.block_size)
            self.train_rows = self.split.rows("train", tokenizer, self.block_size)
        if stage in ("fit", "validate"):
            self.val_rows = self.split.rows("val", tokenizer, self.block_size)
        if stage == "test":
            self.test_rows = self.split.rows("test", tokenizer, self.block_size)

    def current_epoch(self) -> int:
        """The trainer's epoch, which the training batches are cut for (0 without a trainer)."""
        return self.trainer.current_epoch if self.trainer else 0

    # The loaders are the batch iterables themselves: Lightning takes any iterable, and the batches are made
    # in this process already, so a torch DataLoader around them would only add time to every step.
    def train_dataloader(self) -> TrainBatches:
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        return TrainBatches(self.train_rows, self.batch_size, self.current_epoch, shuffle=self.shuffle,
                            seed=self.seed, rank=self.rank, world_size=self.world_size, packed=self.pack,
                            accumulate=accumulate, static=self.static_shapes,
                            repeat=bool(self.trainer and self.trainer.overfit_batches))

    def val_dataloader(self) -> EvalBatches:
        return EvalBatches(self.val_rows, self.eval_batch_size, self.rank, self.world_size)

    def predict_dataloader(self) -> PredictRequests:
        """Sampling requests: this process's share of ``predict_size`` names, in chunks of ``eval_batch_size``,
        drawn with seeds that follow from torch's seed (``--seed_everything``), the rank and the chunk. The
        settings are checked here, against the model, and with only_new the requests carry the names of the
        checkpoint's run (this run's, without a checkpoint)."""
        request = dict(self.predict_request)
        model = self.trainer.lightning_module if self.trainer else None
        known = None
        if request["only_new"]:
            from_checkpoint = self.trainer is not None and self.trainer.ckpt_path is not None
            known = self.loaded_known if from_checkpoint else self.known
            request["known"] = known
        if model is not None:
            options = NameOptions(1, *(request[k] for k in ("prefix", "temperature", "top_k", "top_p", "min_length",
                                                             "max_length", "only_new", "unique", "likeliest")))
            if problem := options_problem(options, model.tokenizer, model.gpt.block_size, known, "--data.predict_"):
                raise UserError(problem[1])
        seed = torch.initial_seed() if self.predict_seed is None else self.predict_seed
        return PredictRequests(self.predict_size, self.eval_batch_size, request, seed, self.rank, self.world_size)

    @property
    def known(self) -> KnownNames:
        """The training and held-out names of this split, as hashes (``microgpt.data.known``)."""
        if self._known is None:
            self._known = KnownNames.of_split(self.split)
        return self._known

    def state_dict(self) -> dict:
        """What every checkpoint keeps of the data: the hashes of the training and held-out names, so that the
        checkpoint alone can tell new names from known ones."""
        return {STATE_KEY: self.known.state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the names a loaded checkpoint carries, for predict's only_new."""
        self.loaded_known = KnownNames.from_state(state_dict.get(STATE_KEY))

    def test_dataloader(self) -> EvalBatches:
        return EvalBatches(self.test_rows, self.eval_batch_size, self.rank, self.world_size)
