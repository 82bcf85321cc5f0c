"""The LightningModule: the GPT plus its loss, metrics, optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from microgpt.checkpoint import FORMAT, FORMAT_KEY
from microgpt.data import IGNORE_INDEX
from microgpt.errors import UserError
from microgpt.model import GPT, Ensemble
from microgpt.optim import MuonWithAdamW
from microgpt.sample import load_members, load_model, sample_names
from microgpt.tokenizer import CharTokenizer


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
        compile: Compile the GPT with ``torch.compile`` (the first steps pay for compiling; weights and
            checkpoints are unchanged).
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
        if init_from is not None:
            # building the start model must not draw from the random numbers this run's own weights use
            with torch.random.fork_rng(devices=[]):
                try:
                    start, start_tokenizer = load_model(init_from)
                except UserError as err:
                    raise UserError(f"--model.init_from {err}") from None
            check_same_sizes(init_from, start, n_embd=n_embd, n_head=n_head, n_layer=n_layer, block_size=block_size)
            self.tokenizer = CharTokenizer("".join(sorted(set(start_tokenizer.chars) | set(vocab))))
            self.hparams.vocab = self.tokenizer.chars  # so that the checkpoint alone describes the model
        self.gpt = GPT(self.tokenizer.vocab_size, n_embd, n_head, n_layer, block_size, dropout)
        if init_from is not None:
            copy_weights(start, start_tokenizer, self.gpt, self.tokenizer)
        if compile:
            self.gpt.compile()  # in place: the parameter names in checkpoints stay the same
        self.ensemble_members: list[GPT] = []  # loaded in setup; a plain list keeps them out of the state_dict
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()
        self.last_train_loss: torch.Tensor | None = None
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
               generator: torch.Generator | None = None) -> list[str]:
        """Invent ``num_samples`` names that start with ``prefix``."""
        return sample_names(self.predictor, self.tokenizer, num_samples, temperature, top_k, prefix, generator)

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        """A batch is a sampling request from the data module: how many names, and how to draw them."""
        return self.sample(batch["count"], batch["temperature"], batch["top_k"], batch["prefix"])

    def logits(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of a batch of padded rows (inputs, targets) or packed rows (inputs, targets, positions)."""
        inputs, targets, positions = batch if len(batch) == 3 else (*batch, None)
        return self.predictor(inputs, positions=positions), targets

    def token_nll(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Negative log-likelihood of every real (non-padded) target token in the batch."""
        logits, targets = self.logits(batch)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return nll[targets.flatten() != IGNORE_INDEX]

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The mean NLL over every target token of the optimizer step, whichever process and micro-batch
        holds the token.

        With W processes, each one's loss is its NLL sum divided by the global token count, times W:
        DDP averages the gradients over processes, so the update equals one process on the whole batch.
        With ``--trainer.accumulate_grad_batches N`` the token count of all N micro-batches is known only
        after the last one: each returns its NLL sum, and ``on_before_optimizer_step`` scales the summed
        gradients, so the update equals one step on all N micro-batches at once.
        """
        logits, targets = self.logits(batch)
        logits, targets = logits.flatten(0, 1), targets.flatten()
        world_size, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        if world_size == 1 and accumulate == 1:
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)  # the mean over the real tokens
            self.end_step(loss.detach())
            return loss
        nll = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        sums = torch.stack([nll.detach(), (targets != IGNORE_INDEX).sum().to(nll.dtype)])
        if accumulate > 1:
            self.accumulated = sums if self.accumulated is None else self.accumulated + sums
            return nll
        nll_total, count_total = self.trainer.strategy.reduce(sums, reduce_op="sum")
        loss, batch_loss = nll * world_size / count_total, nll_total / count_total
        self.end_step(batch_loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """With accumulated micro-batches, scale the summed gradients to the mean over all their tokens
        (Lightning has divided each micro-batch's loss by N, and DDP averages over the W processes)."""
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate == 1:
            return
        nll_total, count_total = self.trainer.strategy.reduce(self.accumulated, reduce_op="sum")
        self.accumulated = None
        scale = accumulate * self.trainer.world_size / count_total
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        self.end_step(nll_total / count_total)

    def end_step(self, batch_loss: torch.Tensor) -> None:
        """Keep the step's loss (the same global value on every process), and log it on logging steps.

        Every step's loss stays on the device until a step where the host waits anyway (a logging step, or
        a checkpoint being written) checks them all, so a non-finite loss is named by its first step and no
        other step waits for the device."""
        self.last_train_loss = batch_loss
        if not self.unchecked_losses:
            self.first_unchecked_step = self.global_step + 1
        self.unchecked_losses.append(batch_loss)
        if len(self.unchecked_losses) >= 1024:  # joined on the device: a run that never logs holds one tensor
            self.unchecked_losses = [self.joined_losses()]
        if self.logs_this_step():
            self.stop_if_nonfinite()
            # Loggers only: Lightning turns progress-bar metrics into Python floats after every step,
            # a host sync per step.
            self.log("train/loss", batch_loss)

    def on_train_start(self) -> None:
        self.accumulated: torch.Tensor | None = None  # (NLL sum, token count) of the micro-batches so far
        self.unchecked_losses: list[torch.Tensor] = []

    def joined_losses(self) -> torch.Tensor:
        """The losses not yet checked, as one tensor on the device."""
        return torch.cat([loss.reshape(-1) for loss in self.unchecked_losses])

    def stop_if_nonfinite(self) -> None:
        """Raise ``NonFiniteLoss`` naming the first step whose training loss was NaN or infinite, if any."""
        if not getattr(self, "unchecked_losses", None):
            return
        losses = self.joined_losses()
        self.unchecked_losses = []
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            i = int(bad[0])
            step = self.first_unchecked_step + i
            hp = self.hparams
            lr = hp.lr * lr_factor(step - 1, int(self.trainer.estimated_stepping_batches), hp.warmup_steps,
                                   hp.min_lr / hp.lr)
            raise NonFiniteLoss(
                f"the training loss is {float(losses[i])} at step {step} (lr {lr:.6g}); "
                "stopped without saving, so the last checkpoint is the last good one."
            )

    def logs_this_step(self) -> bool:
        """Whether the loggers write at the step being trained: every ``log_every_n_steps`` steps.

        ``self.log`` costs about a millisecond of Python per call, as much as the seed model's whole
        forward pass, so ``train/loss`` is only handed to Lightning when a logger will write it.
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.trainer.global_step + 1) % every == 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_nll.update(self.token_nll(batch))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.test_nll.update(self.token_nll(batch))

    def on_validation_epoch_end(self) -> None:
        self.log_split("val", self.val_nll)
        if self._trainer is not None and not self.trainer.sanity_checking:
            self.validated_at_step = self.trainer.global_step

    def on_test_epoch_end(self) -> None:
        self.log_split("test", self.test_nll)

    def log_split(self, split: str, nll: MeanMetric) -> None:
        """Log the mean NLL per character of a split (synced over processes), with perplexity and bits per character."""
        loss = nll.compute()
        nll.reset()
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": loss.exp(), f"{split}/bpc": loss / math.log(2)},
                      prog_bar=split == "val")

    def setup(self, stage: str) -> None:
        if stage == "fit" and (self.trainer.max_steps == 0 or self.trainer.max_steps < -1):
            raise UserError(f"--trainer.max_steps must be a positive integer (or -1 for no limit), "
                            f"got {self.trainer.max_steps}.")
        if self.ensemble_paths:
            if stage == "fit":
                raise UserError("--model.ensemble averages finished runs in validate, test and predict; "
                                "train each member with its own fit.")
            # straight onto the device the strategy is about to move this module to
            self.ensemble_members = load_members(self.ensemble_paths, self.tokenizer, self.gpt.block_size,
                                                 self.trainer.strategy.root_device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to save weights trained on a non-finite loss; store the format version and the random
        state that dropout and sampling draw from."""
        self.stop_if_nonfinite()
        checkpoint[FORMAT_KEY] = FORMAT
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the random state, so a resumed run draws exactly what the uninterrupted run drew."""
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

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
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
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


@torch.no_grad()
def copy_weights(source: GPT, source_tokenizer: CharTokenizer, target: GPT, target_tokenizer: CharTokenizer) -> None:
    """Load ``source``'s weights into ``target``, whose vocabulary holds all of ``source``'s: every token's
    embedding and output rows move to its id in ``target`` (BOS to BOS); rows of the new characters keep
    ``target``'s own, freshly drawn values."""
    rows = torch.tensor([*target_tokenizer.encode(source_tokenizer.chars), target_tokenizer.bos])
    weights = source.state_dict()
    for name in ("wte.weight", "lm_head.weight"):
        moved = target.state_dict()[name].clone()
        moved[rows] = weights[name]
        weights[name] = moved
    target.load_state_dict(weights)


def check_same_sizes(path: str, gpt: GPT, **sizes: int) -> None:
    """Refuse, naming every size that differs, a start checkpoint whose model has other sizes than this one."""
    theirs = {"n_embd": gpt.wte.embedding_dim, "n_head": gpt.blocks[0].attn.n_head,
              "n_layer": len(gpt.blocks), "block_size": gpt.block_size}
    differ = [name for name, value in sizes.items() if theirs[name] != value]
    if differ:
        raise UserError(
            f"--model.init_from {path}: the checkpoint's model has "
            + ", ".join(f"{name} {theirs[name]}" for name in differ) + "; this run's has "
            + ", ".join(f"{name} {sizes[name]}" for name in differ)
            + " (pass the sizes it was trained with, e.g. its --config)."
        )


def check_hyperparameters(**values: float) -> None:
    """Refuse model settings that cannot work, naming the flag, in one sentence."""
    for name in ("n_embd", "n_head", "n_layer", "block_size"):
        if values[name] < 1:
            raise UserError(f"--model.{name} must be a positive integer, got {values[name]}.")
    if values["n_embd"] % values["n_head"]:
        raise UserError(f"--model.n_embd ({values['n_embd']}) must be divisible by --model.n_head ({values['n_head']}).")
    if not 0 <= values["dropout"] < 1:
        raise UserError(f"--model.dropout must be in [0, 1), got {values['dropout']}.")
    if not values["lr"] > 0:
        raise UserError(f"--model.lr must be positive, got {values['lr']}.")
    if not values["muon_lr"] > 0:
        raise UserError(f"--model.muon_lr must be positive, got {values['muon_lr']}.")
    if not 0 <= values["muon_momentum"] < 1:
        raise UserError(f"--model.muon_momentum must be in [0, 1), got {values['muon_momentum']}.")
    for name in ("eps", "weight_decay", "muon_weight_decay", "warmup_steps", "min_lr"):
        if not values[name] >= 0:
            raise UserError(f"--model.{name} must be zero or more, got {values[name]}.")
