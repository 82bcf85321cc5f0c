"""The LightningModule: the GPT, its loss and its held-out scores. The optimizer and the learning-rate schedule
are injected (``model.optimizer`` and ``model.lr_scheduler`` in a recipe); the training loss's bookkeeping is
``microgpt.training.step_losses``, the random state a resumed run continues is ``microgpt.training.random_state``."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt, restricted_number_type
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from microgpt.checkpoints.io import FORMAT, FORMAT_KEY
from microgpt.checkpoints.loading import load_members
from microgpt.data.batches import Batch
from microgpt.data.rows import IGNORE_INDEX
from microgpt.errors import UserError
from microgpt.model.gpt import GPT, Ensemble, size_problem
from microgpt.model.names import predict_names, sample_names
from microgpt.model.tokenizer import CharTokenizer
from microgpt.training.init_from import StartModel
from microgpt.training.optimizers import RunScheduleCallable, WarmupCosine, check_resumable, parameter_groups
from microgpt.training.random_state import restore_random_state, saved_random_state
from microgpt.training.step_losses import StepLosses
from microgpt.training.steps import ended_the_run
from microgpt.training.trainer_settings import check_trainer

Dropout = restricted_number_type("Dropout", float, [(">=", 0), ("<", 1)])


class MicroGPT(L.LightningModule):
    """A character-level GPT trained to predict the next character of a name.

    Args:
        vocab: The vocabulary's characters in id order; linked from the data module.
        n_embd: Width of the residual stream.
        n_head: Number of attention heads; must divide n_embd.
        n_layer: Number of transformer blocks.
        block_size: Context length, shared with the data module.
        dropout: Dropout probability during training.
        optimizer: The optimizer, given two parameter groups: the linear layers' weight matrices (decayed by its
            weight_decay) and the rest (never decayed).
        lr_scheduler: The learning-rate schedule, given the optimizer and the run's optimizer steps.
        compile: Compile the training step's forward pass (torch.compile), for batches of one shape.
        ensemble: Other runs' checkpoints whose predictions validate, test and predict average with this model's.
        init_from: A checkpoint whose weights this new run starts from (fine-tuning); the vocabulary becomes
            the union of its characters and the data's.
    """

    def __init__(self, vocab: str, n_embd: PositiveInt = 16, n_head: PositiveInt = 4, n_layer: PositiveInt = 1,
                 block_size: int = 8, dropout: Dropout = 0.0,
                 optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: RunScheduleCallable = WarmupCosine,
                 compile: bool = False, ensemble: list[str] | None = None, init_from: str | None = None):
        super().__init__()
        # plain numbers (the command line's are typed): they are saved as the checkpoint's hyper-parameters
        (n_embd, n_head, n_layer, block_size), dropout = map(int, (n_embd, n_head, n_layer, block_size)), float(dropout)
        if problem := size_problem("--model.", n_embd=n_embd, n_head=n_head, n_layer=n_layer, block_size=block_size,
                                   dropout=dropout):
            raise UserError(problem)
        # the optimizer, schedule and ensemble are the recipe's (config.yaml); a checkpoint needs no init_from file
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "ensemble", "init_from"])
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.ensemble_paths = list(ensemble or [])
        self.tokenizer = CharTokenizer(vocab)
        start = init_from and StartModel.load(init_from, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
                                              block_size=block_size)
        if start:
            self.tokenizer = start.vocabulary_with(vocab)
            self.hparams.vocab = self.tokenizer.chars  # so that the checkpoint alone describes the model
        self.gpt = GPT(self.tokenizer.vocab_size, n_embd, n_head, n_layer, block_size, dropout)
        if start:
            start.copy_into(self.gpt, self.tokenizer)
        # a compiled function, not a module: the weights, their names and the checkpoints stay the GPT's own
        self.train_forward = torch.compile(self.gpt.forward, dynamic=False) if compile else self.gpt.forward
        self.ensemble_members: list[GPT] = []  # loaded in setup; a plain list keeps them out of the state_dict
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()
        self.step_losses = StepLosses()

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.predictor(idx, positions=positions)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The mean NLL over every target token of the optimizer step: a micro-batch's NLL sum over the step's token
        count (on the host), times W processes (DDP averages) and N micro-batches (Lightning divides by N)."""
        logits, targets = self.train_forward(batch.inputs, positions=batch.positions).flatten(0, 1), batch.targets.flatten()
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches
        if scale == 1:
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)  # the mean over the real tokens
            part = loss.detach()
        else:
            nll = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            loss, part = nll * (scale / batch.step_tokens), nll.detach() / batch.step_tokens
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        if (step_loss := self.step_losses.add(self.trainer, batch_idx, part, lr)) is not None:
            self.log("train/loss", step_loss)  # loggers only: a progress-bar value is a host sync per step
        return loss

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        if ended_the_run(self.trainer, batch_idx):  # Lightning validates a fit asked to stop, in the fit:
            self.trainer.should_stop = True  # ModelCheckpoint sees the final weights' val/loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_nll.update(self.token_nll(batch))

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val", self.val_nll)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.test_nll.update(self.token_nll(batch))

    def on_test_epoch_end(self) -> None:
        self.log_scores("test", self.test_nll)

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        """A batch is a sampling request from the data module: how many names, how to draw them, and a seed."""
        return predict_names(self.predictor, self.tokenizer, batch)

    def setup(self, stage: str) -> None:
        check_trainer(self.trainer, stage)
        self.step_losses.start_fit()
        if self.ensemble_paths and stage == "fit":
            raise UserError("--model.ensemble averages finished runs in validate, test and predict; "
                            "train each member with its own fit.")
        # straight onto the device the strategy is about to move this module to
        self.ensemble_members = load_members(self.ensemble_paths, self.tokenizer, self.gpt.block_size,
                                             self.trainer.strategy.root_device)

    def configure_optimizers(self):
        try:  # torch's checks of the settings, as one line
            optimizer = self.optimizer(parameter_groups(self.gpt))
            schedule = self.lr_scheduler(optimizer, int(self.trainer.estimated_stepping_batches))
        except ValueError as err:
            raise UserError(f"--model.optimizer / --model.lr_scheduler: {err}") from None
        if self.trainer.ckpt_path:  # resuming: the same kind of optimizer
            check_resumable(self.trainer.ckpt_path, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """No weights trained on a non-finite loss; the format and the random state (every DDP process saves)."""
        if self.trainer.training:
            self.step_losses.check(self.trainer)
        checkpoint[FORMAT_KEY] = FORMAT
        checkpoint["rng"] = saved_random_state(self.trainer.world_size, self.device, self.trainer.strategy.all_gather)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run draws what the uninterrupted run drew; ``load_from_checkpoint`` leaves the random state."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a trainer
            return
        restore_random_state(checkpoint.get("rng", {}), trainer.world_size, trainer.global_rank, self.device)

    @property
    def predictor(self) -> torch.nn.Module:
        """The GPT, or with ``ensemble`` the average of it and the other checkpoints' GPTs."""
        if not self.ensemble_members:
            return self.gpt
        return Ensemble([self.gpt, *self.ensemble_members]).train(self.training)

    def token_nll(self, batch: Batch | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Negative log-likelihood of every real (non-padded) target token of a batch."""
        batch = Batch(*batch)
        logits, targets = self(batch.inputs, batch.positions), batch.targets.flatten()
        nll = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="none")
        return nll[targets != IGNORE_INDEX]

    def log_scores(self, split: str, nll: MeanMetric) -> None:
        """The mean NLL per character (synced over processes), perplexity and bits per character of a split."""
        loss = nll.compute()  # NaN for a split without names (ModelCheckpoint needs a val/loss once it validates)
        nll.reset()
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": loss.exp(), f"{split}/bpc": loss / math.log(2)},
                      prog_bar=split == "val", sync_dist=True)  # equal on every process: the mean is the value

    def sample(self, num_samples: int, temperature: float = 0.5, top_k: int | None = None, prefix: str = "",
               generator: torch.Generator | None = None, top_p: float | None = None) -> list[str]:
        """Invent ``num_samples`` names that start with ``prefix`` (``top_p``: nucleus sampling)."""
        return sample_names(self.predictor, self.tokenizer, num_samples, temperature, top_k, prefix, generator, top_p)
