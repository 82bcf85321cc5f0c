"""The command line: LightningCLI wired to the GPT module and the names data.

``python -m microgpt fit --config configs/names.yaml`` (also ``validate``, ``test``, ``predict``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from microgpt.callbacks import AtomicCheckpointIO, ProgressBar, Stopped, Threads, WriteNames
from microgpt.checkpoints.io import find_checkpoint, load_checkpoint
from microgpt.data.datamodule import NamesDataModule
from microgpt.errors import UserError
from microgpt.files import disk_full
from microgpt.training.hooks import QuietProfiler, skip_idle_hooks
from microgpt.training.module import MicroGPT
from microgpt.checkpoints.runs import run_version, with_claimed_version

DESCRIPTIONS = {
    "fit": "microgpt fit: train a GPT on a file of names (start from a recipe: --config configs/names.yaml).",
    "validate": "microgpt validate: score a checkpoint (--ckpt_path) on the validation names.",
    "test": "microgpt test: score a checkpoint (--ckpt_path) on the test names, or on --data.test_path.",
    "predict": "microgpt predict: invent names with a checkpoint (--ckpt_path) and write them to a file.",
}


class WithoutLitLoggerTip(logging.Filter):
    """Drops the one line Lightning prints on every run to advertise its cloud logger
    (``logger_connector.py``, also with ``logger=False``); it shares its logger with microgpt's own lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


WITHOUT_LITLOGGER_TIP = WithoutLitLoggerTip()


def quiet_noise() -> None:
    """For the rest of the command's process: no litlogger tip, no full-disk tracebacks from writer threads, and
    no warnings about Lightning's and jsonargparse's internals, which no user of microgpt can act on."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(WITHOUT_LITLOGGER_TIP)  # once, however often
    threading.excepthook = quiet_full_disk
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*skip_none parameter was deprecated")
    # predict: the names come from an iterable dataset, which has no batch indices, and WriteNames needs none
    warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices")


def quiet_full_disk(args: threading.ExceptHookArgs) -> None:
    """Leave a full disk in a writer's thread (TensorBoard's) unprinted: the writer raises it again in the
    main thread, which reports it in one line; any other error in a thread prints as usual."""
    if disk_full(args.exc_value) is None:
        threading.__excepthook__(args)


class MicroGPTCLI(LightningCLI):
    """LightningCLI with the context length shared by model and data, and the vocabulary linked from the data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.block_size", "data.block_size", apply_on="parse")
        parser.link_arguments("model.compile", "data.static_shapes", apply_on="parse")
        parser.link_arguments("data.vocab", "model.vocab", compute_fn=self.model_vocab, apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then resolve ``--ckpt_path last`` or ``best`` and check the checkpoint before anything reads it."""
        super().parse_arguments(parser, args)
        self.checkpoint = None
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand or "", None)
        if config is None:
            return
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None and config["model"].get("init_from"):
            raise UserError("--model.init_from starts a new run from a checkpoint's weights and --ckpt_path resumes "
                            "a run: pass only one (to continue a fine-tuning run, drop --model.init_from).")
        if ckpt_path in ("last", "best"):
            root = config["trainer"].get("default_root_dir") or os.getcwd()
            found = find_checkpoint(root, ckpt_path)
            if found is None and ckpt_path == "best":
                raise UserError(f"--ckpt_path best: no best.ckpt under {root} (a recipe that validates during fit "
                                "writes one); pass --ckpt_path FILE or --trainer.default_root_dir.")
            if found is None:
                rank_zero_warn(f"--ckpt_path last: no last.ckpt under {root}; starting from scratch.")
            ckpt_path = config["ckpt_path"] = None if found is None else str(found)
        if subcommand in ("validate", "test", "predict"):
            if ckpt_path is None:
                raise UserError(f"{subcommand} needs a trained model: pass --ckpt_path FILE, last or best.")
            # they save no checkpoint, so that the checkpoint callbacks' folder differs from the run's is moot
            # (a resumed fit still says so: its best.ckpt starts afresh in the new folder)
            warnings.filterwarnings("ignore", message=r".*The dirpath has changed from")
        if ckpt_path is not None and ckpt_path != "hpc":
            vocab = load_checkpoint(ckpt_path).get("hyper_parameters", {}).get("vocab")
            self.checkpoint = None if vocab is None else (ckpt_path, vocab)

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

    def instantiate_trainer(self, **kwargs):
        """Lightning's default TensorBoard logger without its ``hp_metric`` placeholder; ``predict`` writes its
        names with ``WriteNames`` unless the recipe brings a prediction writer; a progress bar that is not
        redrawn every step; checkpoints written atomically unless the recipe brings its own ``CheckpointIO``;
        Lightning's hook calls passing by the hooks that do nothing (``microgpt.training.hooks``); one line for a log
        folder that cannot be written."""
        config = self.subcommand_config(self.config_init).get("trainer", {})
        root = config.get("default_root_dir") or os.getcwd()
        if config.get("logger") in (None, True):  # Lightning reads None as its default logger; one folder per run
            version = run_version(Path(root) / "lightning_logs")
            kwargs.setdefault("logger", TensorBoardLogger(root, default_hp_metric=False, version=version))
        elif isinstance(spec := self.subcommand_config(self.config).get("trainer", {}).get("logger"), Namespace):
            kwargs.setdefault("logger", with_claimed_version(config["logger"], spec.init_args.as_dict()))
        callbacks = list(config.get("callbacks") or [])
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            callbacks.append(WriteNames())
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, LightningProgressBar) for c in callbacks):
            callbacks.append(ProgressBar())  # Lightning's bar, drawn a few times a second rather than every step
        if not any(isinstance(c, Threads) for c in callbacks):
            callbacks.append(Threads())  # torch's CPU threads, chosen from the model and batch before the first step
        kwargs.setdefault("callbacks", callbacks)
        if config.get("profiler") is None:
            kwargs.setdefault("profiler", QuietProfiler())
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except Exception as err:
            if not raised_in(err, "accelerator_connector.py"):
                raise
            raise UserError(device_settings_error(config, err)) from None
        skip_idle_hooks(trainer, self.model)
        for folder, flag in [(root, "--trainer.default_root_dir"),
                             *[(logger.save_dir, "--trainer.logger.save_dir") for logger in trainer.loggers]]:
            check_writable(folder, flag)
        return trainer

    def subcommand_config(self, config: Namespace) -> Namespace:
        """The part of a parsed (or instantiated) config that belongs to the subcommand being run: all of it
        with ``run=False``."""
        return config.get(str(self.subcommand), config)

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
        train_loss = model.train_loss()  # summed over the processes: every one of them asks
        rank_zero_info(
            f"final: step {trainer.global_step} | train loss {train_loss:.4f} "
            f"| val loss {val} | {seconds:.1f} s"
        )


def main(args: list[str] | None = None, run: bool = True) -> MicroGPTCLI:
    """Run the command line; a ``UserError`` (or Lightning's ``MisconfigurationException``, its error for
    flags that contradict each other) becomes one line on stderr and exit status 2."""
    quiet_noise()
    try:
        cli = MicroGPTCLI(
            MicroGPT,
            NamesDataModule,
            args=args,
            run=run,
            parser_kwargs={"prog": "microgpt", "description": "microgpt: a character-level GPT for names.",
                           **{sub: {"description": text} for sub, text in DESCRIPTIONS.items()}},
            save_config_kwargs={"overwrite": True},
        )
    except Stopped as stop:
        print(f"microgpt: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except SIGTERMException:  # Lightning's own stop, for a SIGTERM outside the training steps
        print("microgpt: stopped by SIGTERM outside training; nothing more was saved.", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as err:
        if os.environ.get("MICROGPT_DEBUG"):
            raise
        user_error = user_error_behind(err)
        if user_error is not None:
            print(f"microgpt: error: {user_error}", file=sys.stderr)
            raise SystemExit(2) from None
        lost = lost_connection(err)
        if lost is None:
            raise
        print(f"microgpt: error: process {os.environ.get('RANK', os.environ.get('LOCAL_RANK', '0'))} lost its "
              f"connection to another process of this run, which stopped first ({lost}); that process's own "
              "error, printed above, is the cause.", file=sys.stderr)
        raise SystemExit(1) from None
    end_process_group()
    return cli


def end_process_group() -> None:
    """Destroy ``torch.distributed``'s process group once the command is done. Lightning does this at exit for
    NCCL only; a gloo group left to the interpreter's shutdown can abort the process (SIGABRT) after the run's
    work is done and its last line printed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def raised_in(err: BaseException, filename: str) -> bool:
    """Whether ``err`` was raised from code in a file named ``filename``."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(filename):
            return True
        tb = tb.tb_next
    return False


def device_settings_error(config: dict, err: BaseException) -> str:
    """One sentence for a device, strategy or precision that Lightning's trainer cannot set up here: the flags
    as given and Lightning's reason."""
    flags = " ".join(f"--trainer.{name} {config.get(name)}" for name in ("accelerator", "devices", "strategy",
                                                                          "precision") if config.get(name) is not None)
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{flags}: Lightning cannot set these up here: {reason}"


def check_writable(folder: str | os.PathLike | None, flag: str) -> None:
    """Refuse, in one line that names ``flag``, a folder that cannot be created or written to."""
    if folder is None:
        return
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{path}: cannot create this folder ({err.strerror}); choose another with {flag}.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write to this folder; choose another with {flag}.")


def lost_connection(err: BaseException) -> str | None:
    """The first line of a collective's error saying that another process closed its connection, else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        text = str(err)
        if isinstance(err, RuntimeError) and ("closed by peer" in text or "reset by peer" in text):
            return text.strip().splitlines()[0][:200]
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def user_error_behind(err: BaseException) -> Exception | None:
    """``err`` if it is a ``UserError`` or ``MisconfigurationException``, else the first one it was
    raised from (jsonargparse wraps errors raised while it builds a class), else a full disk's ``OSError``
    in that chain as a ``UserError``, else None."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (UserError, MisconfigurationException)):
            return err
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    # else a full disk under any writer (TensorBoard's, Lightning's) is one line too
    return next((full for err in chain if (full := disk_full(err)) is not None), None)
