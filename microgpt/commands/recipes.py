"""The shipped recipes, by name: ``microgpt fit --config names-batched`` works without a checkout.

The recipes live once, in the repository's top-level ``configs/``; ``microgpt/configs`` is a link to it, so
the wheel carries them as package data (``microgpt/configs/*.yaml``) and a checkout reads the same files.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SUFFIX = ".yaml"


def recipe_folder() -> Path:
    """The folder of the shipped recipes."""
    return Path(str(files("microgpt") / "configs"))


def recipe_names() -> list[str]:
    """The shipped recipes' names (their file names without ``.yaml``), sorted."""
    return sorted(path.name[: -len(SUFFIX)] for path in recipe_folder().glob(f"*{SUFFIX}"))


def recipe_path(value: str) -> str:
    """``value`` as ``--config`` reads it: a shipped recipe's file when ``value`` names one (``names-batched``
    or ``names-batched.yaml``) and is not a file here; otherwise ``value`` as it is."""
    if "/" in value or "\\" in value or Path(value).exists():
        return value
    name = value.removesuffix(SUFFIX)
    return str(recipe_folder() / f"{name}{SUFFIX}") if name in recipe_names() else value


def with_recipe_paths(argv: list[str]) -> list[str]:
    """Command-line arguments with each ``--config NAME`` (or ``--config=NAME``) of a shipped recipe made its path."""
    out, after_config = [], False
    for arg in argv:
        if after_config:
            arg = recipe_path(arg)
        elif arg.startswith("--config="):
            arg = "--config=" + recipe_path(arg[len("--config="):])
        after_config = arg == "--config"
        out.append(arg)
    return out
