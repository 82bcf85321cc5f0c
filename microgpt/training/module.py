"""The LightningModule: the GPT plus its loss, metrics, optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from microgpt.data.batches import Batch
from microgpt.checkpoints.io import FORMAT, FORMAT_KEY
from microgpt.errors import UserError
from microgpt.training.init_from import StartModel
from microgpt.checkpoints.loading import load_members
from microgpt.model.gpt import GPT, Ensemble, size_problem
from microgpt.training.optimizers import MuonWithAdamW
from microgpt.training.random_state import restore_random_state, saved_random_state
from microgpt.data.rows import IGNORE_INDEX
from microgpt.commands.sample import predict_names, sample_names
from microgpt.training.step_losses import StepLosses, first_non_finite
from microgpt.model.tokenizer import CharTokenizer


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite; the run stops without saving."""


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup ramps ``(step + 1) / warmup_steps`` so the first step never has lr 0; the cosine part
    goes from 1 at ``warmup_steps`` towards ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return min_lr_ratio + (1 - min_lr_ratio) * cosine


class MicroGPT(L.LightningModule):
    """A character-level GPT trained to predict the next character of a name.

    Args:
        vocab: The vocabulary's characters in id order; linked from the data module.
        n_embd: Width of the residual stream.
        n_head: Number of attention heads; must divide n_embd.
        n_layer: Number of transformer blocks.
        block_size: Context length, shared with the data module.
        dropout: Dropout probability during training.
        lr: Peak learning rate (of AdamW; with ``optimizer: muon``, of the parameters Muon leaves to AdamW).
        betas: Adam's beta1 and beta2.
        eps: Adam's epsilon.
        weight_decay: AdamW weight decay, applied to the weight matrices of the linear layers only.
        optimizer: ``adamw`` for every parameter, or ``muon``: Muon (``torch.optim.Muon``, torch 2.9 or later)
            for the blocks' weight matrices and AdamW for the embeddings and the output head.
        muon_lr: Muon's peak learning rate (scaled by sqrt(rows / columns) for matrices taller than wide).
        muon_momentum: Muon's momentum (Nesterov).
        muon_weight_decay: Muon's decoupled weight decay of the blocks' weight matrices.
        warmup_steps: Optimizer steps of linear warmup before the cosine decay.
        min_lr: The learning rate the cosine decay ends at (Muon's ends at the same fraction of muon_lr).
        compile: Compile the training step's forward pass with ``torch.compile``, for batches of one shape
            (--data.static_shapes, linked); evaluation and generation run eager. The first step pays for
            compiling; weights and checkpoints are unchanged.
        ensemble: Checkpoints of other runs (same vocabulary and context length) whose predicted
            probabilities validate, test and predict average with this model's; fit refuses it.
        init_from: A checkpoint whose weights this new run starts from (fine-tuning); its sizes must
            equal this model's, and the vocabulary becomes the union of its characters and the data's.
    """

    def __init__(
        self,
        vocab: str,
        n_embd: int = 16,
        n_head: int = 4,
        n_layer: int = 1,
        block_size: int = 8,
        dropout: float = 0.0,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        compile: bool = False,
        ensemble: list[str] | None = None,
        init_from: str | None = None,
    ):
        super().__init__()
        check_hyperparameters(n_embd=n_embd, n_head=n_head, n_layer=n_layer, block_size=block_size,
                              dropout=dropout, lr=lr, eps=eps, weight_decay=weight_decay,
                              warmup_steps=warmup_steps, min_lr=min_lr, muon_lr=muon_lr,
                              muon_momentum=muon_momentum, muon_weight_decay=muon_weight_decay)
        # not saved with the weights: LightningCLI re-reads a checkpoint's hyper-parameters over the command
        # line's, so a saved value would override --model.ensemble at test time, and a fine-tuned checkpoint
        # would need its init_from file to load
        self.save_hyperparameters(ignore=["ensemble", "init_from"])
        self.ensemble_paths = list(ensemble or [])
        self.tokenizer = CharTokenizer(vocab)
        start = None
        if init_from is not None:
            start = StartModel.load(init_from, n_embd=n_embd, n_head=n_head, n_layer=n_layer, block_size=block_size)
            self.tokenizer = start.vocabulary_with(vocab)
            self.hparams.vocab = self.tokenizer.chars  # so that the checkpoint alone describes the model
        self.gpt = GPT(self.tokenizer.vocab_size, n_embd, n_head, n_layer, block_size, dropout)
        if start is not None:
            start.copy_into(self.gpt, self.tokenizer)
        # a compiled function, not a module: the weights, their names and the checkpoints stay the GPT's own
        self.train_forward = torch.compile(self.gpt.forward, dynamic=False) if compile else self.gpt.forward
        self.ensemble_members: list[GPT] = []  # loaded in setup; a plain list keeps them out of the state_dict
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()
        self.step_losses = StepLosses()
        self.validated_at_step: int | None = None  # the optimizer step of the latest validation

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.predictor(idx)

    @property
    def predictor(self) -> nn.Module:
        """The GPT, or with ``ensemble`` the average of it and the other checkpoints' GPTs."""
        if not self.ensemble_members:
            return self.gpt
        return Ensemble([self.gpt, *self.ensemble_members]).train(self.training)

    def sample(self, num_samples: int, temperature: float = 0.5, top_k: int | None = None, prefix: str = "",
               generator: torch.Generator | None = None, top_p: float | None = None) -> list[str]:
        """Invent ``num_samples`` names that start with ``prefix`` (``top_p``: nucleus sampling)."""
        return sample_names(self.predictor, self.tokenizer, num_samples, temperature, top_k, prefix, generator, top_p)

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        """A batch is a sampling request from the data module: how many names, how to draw them, and a seed."""
        return predict_names(self.predictor, self.tokenizer, batch)

    def logits_and_targets(self, batch: Batch | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of a batch of padded rows (inputs, targets) or packed rows (inputs, targets, positions)."""
        batch = Batch(*batch)
        return self.predictor(batch.inputs, positions=batch.positions), batch.targets

    def token_nll(self, batch: Batch | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Negative log-likelihood of every real (non-padded) target token in the batch."""
        logits, targets = self.logits_and_targets(batch)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return nll[targets.flatten() != IGNORE_INDEX]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The mean NLL over every target token of the optimizer step, whichever process and micro-batch
        holds the token.

        The batch says how many target tokens its optimizer step has over all processes and micro-batches
        (``step_tokens``, counted on the host). Each micro-batch's loss is its NLL sum over that count, times
        W processes (DDP averages their gradients) and N micro-batches (Lightning divides each one's loss by
        N): the summed gradients are those of one step on the whole batch, with no collective and no scaling
        afterwards, so gradient clipping sees them as they are.
        """
        logits, targets = self.train_forward(batch.inputs, positions=batch.positions), batch.targets
        logits, targets = logits.flatten(0, 1), targets.flatten()
        world_size, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        if world_size == 1 and accumulate == 1:
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)  # the mean over the real tokens
            self.record_step_loss(loss.detach())
            return loss
        nll = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        # this process's and micro-batch's part of the step's loss
        self.step_losses.add_part(nll.detach() / batch.step_tokens)
        if self.ends_optimizer_step(batch_idx):
            self.record_step_loss(self.step_losses.finish_step())
        return nll * (world_size * accumulate / batch.step_tokens)

    def ends_optimizer_step(self, batch_idx: int) -> bool:
        """Whether the optimizer steps after this batch: every N-th batch of an epoch, and its last."""
        accumulate = self.trainer.accumulate_grad_batches
        return (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == self.trainer.num_training_batches

    def record_step_loss(self, part: torch.Tensor) -> None:
        """Keep this process's part of the finished step's loss (``microgpt.training.step_losses``), and on logging steps
        check the losses kept so far and log the latest."""
        self.step_losses.record(self.global_step + 1, part)
        if self.logs_this_step():
            losses = self.check_losses()
            # Loggers only: Lightning turns progress-bar metrics into Python floats after every step,
            # a host sync per step.
            self.log("train/loss", losses[-1])

    def on_train_start(self) -> None:
        self.step_losses.start_fit()

    @property
    def last_train_loss(self) -> torch.Tensor | None:
        """This process's part of the latest optimizer step's training loss (the whole loss on one process)."""
        return self.step_losses.latest

    def train_loss(self) -> float:
        """The latest step's training loss over all processes (a collective under DDP: every process calls it)."""
        loss = self.last_train_loss.reshape(1)
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")
        return float(loss[0])

    def check_losses(self) -> torch.Tensor:
        """The losses of the steps since the last check, summed over processes; raises ``NonFiniteLoss``
        naming the first step whose loss was NaN or infinite. Every process calls it at the same steps."""
        losses = self.step_losses.take_unchecked(self.device)
        if self.trainer.world_size > 1:
            losses = self.trainer.strategy.reduce(losses, reduce_op="sum")
        i = first_non_finite(losses)
        if i is not None:
            step = self.step_losses.first_unchecked_step + i
            hp = self.hparams
            lr = hp.lr * lr_factor(step - 1, int(self.trainer.estimated_stepping_batches), hp.warmup_steps,
                                   hp.min_lr / hp.lr)
            raise NonFiniteLoss(
                f"the training loss is {float(losses[i])} at step {step} (lr {lr:.6g}); "
                "stopped without saving, so the last checkpoint is the last good one."
            )
        return losses

    def logs_this_step(self) -> bool:
        """Whether the loggers write at the step being trained: every ``log_every_n_steps`` steps.

        ``self.log`` costs as much Python as the seed model's whole forward pass, so ``train/loss`` is
        only handed to Lightning when a logger will write it.
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.trainer.global_step + 1) % every == 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_nll.update(self.token_nll(batch))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.test_nll.update(self.token_nll(batch))

    def on_validation_epoch_end(self) -> None:
        self.log_split("val", self.val_nll)
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.trainer.global_step

    def on_test_epoch_end(self) -> None:
        self.log_split("test", self.test_nll)

    def log_split(self, split: str, nll: MeanMetric) -> None:
        """Log the mean NLL per character of a split (synced over processes), with perplexity and bits per character."""
        loss = nll.compute()
        nll.reset()
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": loss.exp(), f"{split}/bpc": loss / math.log(2)},
                      prog_bar=split == "val", sync_dist=True)  # equal on every process: the mean is the value

    def setup(self, stage: str) -> None:
        if stage == "fit" and (self.trainer.max_steps == 0 or self.trainer.max_steps < -1):
            raise UserError(f"--trainer.max_steps must be a positive integer (or -1 for no limit), "
                            f"got {self.trainer.max_steps}.")
        precision = str(self.trainer.precision)
        if stage == "fit" and precision.endswith("-true") and precision != "32-true" and precision != "64-true":
            mixed = precision.replace("-true", "-mixed")
            raise UserError(f"--trainer.precision {precision} would keep the weights and Adam's moments in "
                            f"{precision.split('-')[0]} bits, where a small model's updates round away; train with "
                            f"--trainer.precision {mixed} (float32 weights, half-precision matrix products).")
        if self.ensemble_paths:
            if stage == "fit":
                raise UserError("--model.ensemble averages finished runs in validate, test and predict; "
                                "train each member with its own fit.")
            # straight onto the device the strategy is about to move this module to
            self.ensemble_members = load_members(self.ensemble_paths, self.tokenizer, self.gpt.block_size,
                                                 self.trainer.strategy.root_device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to save weights trained on a non-finite loss; store the format version and the random
        state (``microgpt.training.random_state``; a collective under DDP: every process saves)."""
        if self.trainer.training:
            self.check_losses()
        checkpoint[FORMAT_KEY] = FORMAT
        checkpoint["rng"] = saved_random_state(self.trainer.world_size, self.device, self.trainer.strategy.all_gather)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A trainer resuming a run: restore the random state, so the run draws exactly what the uninterrupted
        run drew. ``MicroGPT.load_from_checkpoint`` (no trainer) leaves torch's random state alone."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a trainer
            return
        if trainer is not None:
            restore_random_state(checkpoint.get("rng", {}), trainer.world_size, trainer.global_rank, self.device)

    def configure_optimizers(self):
        """AdamW (decay on the linear layers' weight matrices only), or with ``optimizer: muon`` Muon for the
        blocks' weight matrices and AdamW for the rest, as one optimizer; the step-wise warmup and cosine
        schedule scales every group's learning rate."""
        hp = self.hparams
        embeddings = {id(m.weight) for m in self.gpt.modules() if isinstance(m, nn.Embedding)}
        matrices = [p for p in self.gpt.blocks.parameters() if p.dim() == 2] if hp.optimizer == "muon" else []
        rest = [p for p in self.gpt.parameters() if id(p) not in {id(m) for m in matrices}]
        decay = [p for p in rest if p.dim() >= 2 and id(p) not in embeddings]
        no_decay = [p for p in rest if p.dim() < 2 or id(p) in embeddings]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if matrices:
            # names for LearningRateMonitor's tags (lr-MuonWithAdamW/muon, ...)
            for group, name in zip(groups, ("adamw", "adamw-no_decay")):
                group["name"] = name
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                      # torch's default on the CPU: the seed's exact numbers
                                      fused=True if self.device.type == "cuda" else None)
        if matrices:
            muon = muon_class()(
                [{"params": matrices, "name": "muon"}], lr=hp.muon_lr, momentum=hp.muon_momentum,
                weight_decay=hp.muon_weight_decay, nesterov=True,
            )
            optimizer = MuonWithAdamW(muon, optimizer)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, hp.warmup_steps, hp.min_lr / hp.lr)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def muon_class() -> type[torch.optim.Optimizer]:
    """``torch.optim.Muon``, or a ``UserError`` if the installed torch has none."""
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise UserError(f"--model.optimizer muon needs torch.optim.Muon, which torch {torch.__version__} lacks "
                        "(torch 2.9 and later have it); upgrade torch or use --model.optimizer adamw.")
    return muon


def check_hyperparameters(**values: float) -> None:
    """Refuse model settings that cannot work, naming the flag, in one sentence."""
    sizes = {name: values[name] for name in ("n_embd", "n_head", "n_layer", "block_size", "dropout")}
    if problem := size_problem("--model.", **sizes):
        raise UserError(problem)
    if not values["lr"] > 0:
        raise UserError(f"--model.lr must be positive, got {values['lr']}.")
    if not values["muon_lr"] > 0:
        raise UserError(f"--model.muon_lr must be positive, got {values['muon_lr']}.")
    if not 0 <= values["muon_momentum"] < 1:
        raise UserError(f"--model.muon_momentum must be in [0, 1), got {values['muon_momentum']}.")
    for name in ("eps", "weight_decay", "muon_weight_decay", "warmup_steps", "min_lr"):
        if not values[name] >= 0:
            raise UserError(f"--model.{name} must be zero or more, got {values[name]}.")
