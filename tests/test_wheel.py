"""Installed as users install it: a wheel built from the checkout, installed into a fresh virtualenv, run from a
folder outside the checkout with a shipped recipe by name, then ``sample``.

The virtualenv sees the system's site-packages (``--system-site-packages``) so that torch, Lightning and the
other dependencies are the installed ones rather than a download; microgpt itself comes from the wheel only
(checked: the imported package lies in the virtualenv).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several fresh fits or processes: `-m "not slow"` leaves them out

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout's sources (nothing is written into the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("microgpt", "configs"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    # with setuptools here, build with it (no download); else pip fetches it into an isolated build environment
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation,
                    "--wheel-dir", str(work / "dist"), str(source)], check=True, cwd=work, timeout=120)
    (found,) = (work / "dist").glob("*.whl")
    return found


def test_the_wheel_holds_every_module_and_the_package_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        inside = {name for name in archive.namelist() if name.startswith("microgpt/")}
    package = ROOT / "microgpt"
    expected = {f"microgpt/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
                if "__pycache__" not in p.parts}
    expected |= {"microgpt/data/names.txt", "microgpt/data/NOTICE", "microgpt/commands/page.html"}
    expected |= {f"microgpt/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert expected - inside == set()
    assert wheel.name.startswith("microgpt_names-")  # the distribution's own name; "microgpt" is another project


def test_a_shipped_recipe_and_sample_run_from_the_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, env=env, timeout=120)
    here = tmp_path / "elsewhere"  # no configs/, no checkout
    here.mkdir()

    where = subprocess.run([str(python), "-c", "import microgpt; print(microgpt.__file__)"], cwd=here, env=env,
                           check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    assert Path(where).is_relative_to(venv)

    fit = subprocess.run(["microgpt", "fit", "--config", "names", "--trainer.max_steps", "5"], cwd=here, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "\nfinal: step 5 | train loss " in fit.stdout + fit.stderr
    assert (here / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    sample = subprocess.run(["microgpt", "sample", "--ckpt_path", "last", "--num_samples", "3"], cwd=here, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert len(sample.stdout.strip().splitlines()) == 3


def test_the_shipped_recipes_are_the_top_level_configs_and_are_listed_by_name():
    from microgpt.__main__ import USAGE
    from microgpt.commands.recipes import recipe_folder, recipe_names, with_recipe_paths

    assert recipe_folder().resolve() == (ROOT / "configs").resolve()  # one folder, not a copy
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert recipe_names() == names
    listed = " ".join(USAGE.split())
    assert all(f" {name}," in listed or f" {name}:" in listed for name in names)
    argv = ["fit", "--config", "names-batched", "--config=names.yaml", "--config", "configs/names.yaml", "--config",
            "nosuch"]
    assert with_recipe_paths(argv) == ["fit", "--config", str(recipe_folder() / "names-batched.yaml"),
                                       f"--config={recipe_folder() / 'names.yaml'}", "--config", "configs/names.yaml",
                                       "--config", "nosuch"]
