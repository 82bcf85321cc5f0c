"""The command line: LightningCLI wired to the GPT module and the names data.

``python -m microgpt fit --config configs/names.yaml`` (also ``validate``, ``test``, ``predict``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from microgpt.checkpoint import Stopped, find_last_checkpoint, load_checkpoint
from microgpt.data import NamesDataModule
from microgpt.errors import UserError
from microgpt.module import MicroGPT

# Noise from inside the installed Lightning, not about anything a user of microgpt can change.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r".*skip_none parameter was deprecated")
# validate/test/predict with a weight-averaging recipe: the checkpoint's state_dict already holds the
# averaged weights, which is what those commands should score, so there is nothing to restore.
warnings.filterwarnings("ignore", message=r".*WeightAveraging callback, but loading a checkpoint outside the 'fit'")
# validate/test from a run's checkpoint writes nothing, so the checkpoint callback's new folder does not matter
warnings.filterwarnings("ignore", message=r".*The dirpath has changed from")
# predict: the names come from an iterable dataset, which has no batch indices, and WriteNames needs none
warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices")


class MicroGPTCLI(LightningCLI):
    """LightningCLI with the context length shared by model and data, and the vocabulary linked from the data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.block_size", "data.block_size", apply_on="parse")
        parser.link_arguments("data.vocab", "model.vocab", compute_fn=self.model_vocab, apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then resolve ``--ckpt_path last`` and check the checkpoint before anything reads it."""
        super().parse_arguments(parser, args)
        self.checkpoint = None
        config = self.config.get(self.config.get("subcommand") or "", None)
        if config is None or config.get("ckpt_path") is None:
            return
        if config["model"].get("init_from"):
            raise UserError("--model.init_from starts a new run from a checkpoint's weights and --ckpt_path resumes "
                            "a run: pass only one (to continue a fine-tuning run, drop --model.init_from).")
        if config["ckpt_path"] in ("best", "hpc"):
            return
        if config["ckpt_path"] == "last":
            root = config["trainer"].get("default_root_dir") or os.getcwd()
            last = find_last_checkpoint(root)
            if last is None:
                rank_zero_warn(f"--ckpt_path last: no last.ckpt under {root}; starting from scratch.")
            config["ckpt_path"] = None if last is None else str(last)
        if config["ckpt_path"] is not None:
            vocab = load_checkpoint(config["ckpt_path"]).get("hyper_parameters", {}).get("vocab")
            self.checkpoint = None if vocab is None else (config["ckpt_path"], vocab)

    def model_vocab(self, vocab: str) -> str:
        """The model's vocabulary: the data's, or with ``--ckpt_path`` the checkpoint's, which must hold the data's."""
        if self.checkpoint is None:
            return vocab
        path, known = self.checkpoint
        new = "".join(sorted(set(vocab) - set(known)))
        if new and self.config["subcommand"] == "fit":
            raise UserError(f"{path}: the data has characters this run's model does not know: {new!r}; to train "
                            f"on a new list, start a new run from its weights with --model.init_from {path}.")
        return known

    def before_fit(self) -> None:
        self.fit_started = time.perf_counter()

    def after_fit(self) -> None:
        """Score the held-out names with the final weights (unless that just happened), then print one summary line."""
        trainer, model = self.trainer, self.model
        if trainer.interrupted or model.last_train_loss is None:
            return
        val_loss = trainer.callback_metrics.get("val/loss")
        if trainer.limit_val_batches and (val_loss is None or model.validated_at_step != trainer.global_step):
            trainer.validate(model, datamodule=self.datamodule, verbose=False)
            val_loss = trainer.callback_metrics.get("val/loss")
        seconds = time.perf_counter() - self.fit_started
        val = f"{float(val_loss):.4f}" if val_loss is not None else "n/a"
        rank_zero_info(
            f"final: step {trainer.global_step} | train loss {float(model.last_train_loss):.4f} "
            f"| val loss {val} | {seconds:.1f} s"
        )


def main(args: list[str] | None = None, run: bool = True) -> MicroGPTCLI:
    """Run the command line; a ``UserError`` (or Lightning's ``MisconfigurationException``, its error for
    flags that contradict each other) becomes one line on stderr and exit status 2."""
    try:
        return MicroGPTCLI(
            MicroGPT,
            NamesDataModule,
            args=args,
            run=run,
            parser_kwargs={"prog": "microgpt"},
            save_config_kwargs={"overwrite": True},
        )
    except Stopped as stop:
        print(f"microgpt: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except SIGTERMException:  # Lightning's own stop, for a SIGTERM outside the training steps
        print("microgpt: stopped by SIGTERM outside training; nothing more was saved.", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as err:
        user_error = user_error_behind(err)
        if user_error is None or os.environ.get("MICROGPT_DEBUG"):
            raise
        print(f"microgpt: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def user_error_behind(err: BaseException) -> Exception | None:
    """``err`` if it is a ``UserError`` or ``MisconfigurationException``, else the first one it was
    raised from (jsonargparse wraps errors raised while it builds a class), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (UserError, MisconfigurationException)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
