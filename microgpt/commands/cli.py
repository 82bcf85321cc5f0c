"""The command line: LightningCLI wired to the GPT module and the names data.

``python -m microgpt fit --config configs/names.yaml`` (also ``validate``, ``test``, ``predict``). What microgpt
adds to Lightning's trainer (the run's TensorBoard folder, atomic checkpoints) is set as defaults of the parsed
config, so ``--print_config`` and the run's ``config.yaml`` show it.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from microgpt.callbacks import RunLogger, Stopped, Threads, WriteNames
from microgpt.checkpoints.io import load_checkpoint, resolve_checkpoint
from microgpt.checkpoints.runs import with_claimed_version
from microgpt.commands.recipes import with_recipe_paths
from microgpt.data.datamodule import NamesDataModule
from microgpt.errors import UserError, exit_on_user_error, user_error_behind
from microgpt.files import disk_full
from microgpt.training.module import MicroGPT
from microgpt.training.trainer_settings import check_trainer

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


class MicroGPTParser(LightningArgumentParser):
    """LightningCLI's parser, refusing abbreviated flags, with an error in one line that names the closest real
    flag, and reading the hyper-parameters of checkpoints written before the optimizer became a class path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UserError(one_line(message, parser))

    def add_method_arguments(self, *args, **kwargs):
        """The trainer method's arguments (``--ckpt_path``), with microgpt's words for ``ckpt_path``."""
        added = super().add_method_arguments(*args, **kwargs)
        for action in self._actions:
            if action.dest == "ckpt_path":
                action.help = CKPT_PATH_HELP
        return added

    def parse_object(self, cfg_obj, *args, **kwargs):
        return super().parse_object(without_old_optimizer(cfg_obj), *args, **kwargs)


CKPT_PATH_HELP = ("A checkpoint file, or 'last' / 'best': the newest run's last.ckpt / best.ckpt under "
                  "--trainer.default_root_dir. fit resumes from it exactly; validate, test and predict score or "
                  "sample its weights.")


class MicroGPTCLI(LightningCLI):
    """LightningCLI with the context length shared by model and data, and the vocabulary linked from the data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.block_size", "data.block_size", apply_on="parse")
        parser.link_arguments("model.compile", "data.static_shapes", apply_on="parse")
        parser.link_arguments("data.vocab", "model.vocab", compute_fn=self.model_vocab, apply_on="instantiate")
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=root_dir,
                              apply_on="parse")
        parser.add_lightning_class_args(WriteNames, "predictions")  # in every subcommand; writes in predict
        parser.add_lightning_class_args(Threads, "threads")  # torch's CPU threads, chosen before the first step

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
            found = resolve_checkpoint(ckpt_path, root, "--trainer.default_root_dir", start_afresh=subcommand == "fit")
            if found is None:
                rank_zero_warn(f"--ckpt_path last: no last.ckpt under {root}; starting from scratch.")
            ckpt_path = config["ckpt_path"] = found
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
        """Lightning's trainer, with one line for settings it cannot set up here, for a trainer setting microgpt
        refuses, and for a log folder that cannot be written, before anything is written."""
        spec = self.config.get(str(self.subcommand), self.config)["trainer"].get("logger")
        logger = self.config_init.get(str(self.subcommand), self.config_init)["trainer"].get("logger")
        if isinstance(spec, Namespace) and not isinstance(logger, RunLogger):  # a user's own TensorBoard or CSV
            kwargs.setdefault("logger", with_claimed_version(logger, spec.init_args.as_dict()))  # logger too
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, RuntimeError, ImportError) as err:
            if user_error_behind(err) is not None:
                raise
            config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
            raise UserError(device_settings_error(config, err)) from None
        check_trainer(trainer, self.subcommand or "fit")
        for folder, flag in [(trainer.default_root_dir, "--trainer.default_root_dir"),
                             *[(logger.save_dir, "--trainer.logger.save_dir") for logger in trainer.loggers]]:
            check_writable(folder, flag)
        return trainer

    def before_fit(self) -> None:
        self.fit_started = time.perf_counter()

    def after_fit(self) -> None:
        """Print one summary line: the final step, its training loss, and the final weights' validation loss
        (scored inside the fit, where ModelCheckpoint sees it)."""
        trainer, model = self.trainer, self.model
        if trainer.interrupted or model.step_losses.latest is None:
            return
        val_loss = trainer.callback_metrics.get("val/loss")
        scored = val_loss is not None and len(self.datamodule.val_rows) > 0  # no names: no loss, rather than NaN
        val = f"{float(val_loss):.4f}" if scored else "n/a"
        train_loss = model.step_losses.summed_latest(trainer)  # summed over the processes: every one of them asks
        rank_zero_info(
            f"final: step {trainer.global_step} | train loss {train_loss:.4f} "
            f"| val loss {val} | {time.perf_counter() - self.fit_started:.1f} s"
        )


TRAINER_DEFAULTS = {
    # Lightning's TensorBoard logger, in a run folder claimed by creating it (runs started together never share one)
    "logger": {"class_path": "microgpt.callbacks.RunLogger"},
    # checkpoints written whole or not at all, and read with weights_only=True
    "plugins": [{"class_path": "microgpt.callbacks.AtomicCheckpointIO"}],
}


def root_dir(default_root_dir: str | None) -> str:
    """The folder a run's logger writes in: --trainer.default_root_dir, else the current one."""
    return default_root_dir or os.getcwd()


OLD_OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "optimizer", "muon_lr", "muon_momentum",
                      "muon_weight_decay", "warmup_steps", "min_lr")


def without_old_optimizer(config):
    """A config to parse, without the optimizer settings that checkpoints written before the optimizer became a
    class path keep among their hyper-parameters (``lr``, ``optimizer: adamw``, ...), which LightningCLI reads
    back with --ckpt_path; the recipe on the command line chooses the optimizer, as it does for newer ones."""
    if not isinstance(config, dict):
        return config
    for part in config.values():
        model = part.get("model") if isinstance(part, dict) else None
        if isinstance(model, dict) and not isinstance(model.get("optimizer"), dict):
            for key in OLD_OPTIMIZER_KEYS:
                model.pop(key, None)
    return config


RESTRICTIONS = {"PositiveInt": "a positive integer", "NonNegativeInt": "zero or more", "PositiveFloat": "positive",
                "NonNegativeFloat": "zero or more", "ClosedUnitInterval": "in [0, 1]", "OpenUnitInterval": "in (0, 1)",
                "Dropout": "in [0, 1)"}


def one_line(message: str, parser) -> str:
    """jsonargparse's error as one line: a value outside its type's range as the sentence microgpt's own checks
    write, a flag that does not exist with the closest one that does, anything else its first words."""
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip(" -")] or ["bad arguments"]
    key = re.fullmatch(r'Parser key "([^"]+)":', lines[0])
    if key and len(lines) > 1:
        if (typed := re.fullmatch(r"Not of type (\w+): (.*?) does not conform to restriction .*", lines[1])) and \
                typed[1] in RESTRICTIONS:
            return f"--{key[1]} must be {RESTRICTIONS[typed[1]]}, got {typed[2]}."
        given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
        return f"--{key[1]}: {lines[1]}" if given is None else f"--{key[1]} cannot be {given!r}."
    flags = [option for action in parser._actions for option in action.option_strings]
    for given in re.findall(r"--[\w.]+", message):
        if given not in flags and (close := difflib.get_close_matches(given, flags, n=1, cutoff=0.6)):
            return f"{lines[0].rstrip('.')}; did you mean {close[0]}?"
    return lines[0]


def main(args: list[str] | None = None, run: bool = True) -> MicroGPTCLI:
    """Run the command line; a ``UserError`` (or Lightning's ``MisconfigurationException``, its error for flags
    that contradict each other) is one line on stderr and exit status 2."""
    quiet_noise()
    if args is None:  # a shipped recipe by name; in sys.argv, which the DDP launcher starts the other ranks with
        sys.argv[1:] = with_recipe_paths(sys.argv[1:])
    elif isinstance(args, list):
        args = with_recipe_paths(args)
    try:
        with exit_on_user_error("microgpt", translate=user_error_or_misconfiguration):
            cli = MicroGPTCLI(
                MicroGPT, NamesDataModule, args=args, run=run, parser_class=MicroGPTParser,
                trainer_defaults=TRAINER_DEFAULTS, auto_configure_optimizers=False,
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
        lost = lost_connection(err)
        if lost is None or os.environ.get("MICROGPT_DEBUG"):
            raise
        print(f"microgpt: error: process {os.environ.get('RANK', os.environ.get('LOCAL_RANK', '0'))} lost its "
              f"connection to another process of this run, which stopped first ({lost}); that process's own "
              "error, printed above, is the cause.", file=sys.stderr)
        raise SystemExit(1) from None
    end_process_group()
    return cli


def user_error_or_misconfiguration(err: BaseException) -> UserError | None:
    """The ``UserError`` behind ``err``, or Lightning's ``MisconfigurationException`` as one."""
    if isinstance(err, MisconfigurationException):
        return UserError(str(err).strip().splitlines()[0])
    return user_error_behind(err)


def end_process_group() -> None:
    """Destroy ``torch.distributed``'s process group once the command is done. Lightning does this at exit for
    NCCL only; a gloo group left to the interpreter's shutdown can abort the process (SIGABRT) after the run's
    work is done and its last line printed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
