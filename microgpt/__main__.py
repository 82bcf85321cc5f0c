"""``microgpt`` / ``python -m microgpt``: LightningCLI's fit/validate/test/predict, plus ``sample`` and ``serve``
(torch only).

This file imports neither torch nor Lightning, so that the overview below prints at once.
"""

import sys

from microgpt.errors import UserError, exit_on_user_error
from microgpt.threads import before_torch

USAGE = """\
usage: microgpt {fit,validate,test,predict,sample,serve} [options]

microgpt: a small, exact character-level GPT that learns from a file of names (one per line)
and invents new ones. Trained with PyTorch Lightning; runs on CPU, GPU, several devices.

commands:
  fit       train a model; a recipe gives every setting (--config names, names-batched, names-fast,
            names-best, names-best-adamw, finetune: shipped with microgpt; or a recipe's path)
  validate  score a trained checkpoint on the validation names
  test      score a trained checkpoint on the test names, or on --data.test_path
  predict   invent names with a checkpoint through Lightning, written to a file
  sample    invent names with a checkpoint, quickly, with torch alone
  serve     serve a checkpoint over HTTP, with a page to try it (needs LitServe)

example:
  microgpt fit --config names              (a shipped recipe by name, or a recipe's path)
  microgpt sample --ckpt_path last

more help:
  microgpt fit --help       every trainer, model and data flag (also validate, test, predict)
  microgpt sample --help    the sampling flags
  microgpt serve --help     the serving flags
"""


def main() -> None:
    if problem := before_torch():  # OpenMP's settings, checked and chosen before anything loads it
        print(f"microgpt: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    command = sys.argv[1:2]
    if command in ([], ["-h"], ["--help"]):
        sys.stdout.write(USAGE)
    elif command == ["sample"]:
        from microgpt.commands.sample import main as sample_main

        sample_main(sys.argv[2:])
    elif command == ["serve"]:
        with exit_on_user_error("microgpt serve"):
            try:
                from microgpt.commands.serve import main as serve_main
            except ModuleNotFoundError as err:
                if err.name != "litserve":
                    raise
                raise UserError("serving needs LitServe: pip install 'litserve>=0.2.19'") from None
        serve_main(sys.argv[2:])
    elif command == ["export"]:
        from microgpt.commands.export import main as export_main

        export_main(sys.argv[2:])
    else:
        from microgpt.commands.cli import main as cli_main

        cli_main()


if __name__ == "__main__":
    main()
