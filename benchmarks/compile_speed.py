"""Eager against ``--model.compile true``: milliseconds per training step of each recipe, each a fresh ``fit``.

    python benchmarks/compile_speed.py                       # names-batched and names-best on the CPU
    python benchmarks/compile_speed.py --accelerator gpu --steps 600

Each run is ``python -m microgpt fit --config RECIPE --trainer.max_steps STEPS --model.compile false|true``
(``gpu_check.fit``); the step time is the mean over the steps after ``--warmup`` (so compiling is left out
of it), and the wall time is the whole process's, compiling included.
"""

from __future__ import annotations

import argparse

from gpu_check import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu", help="cpu (default) or gpu")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run")
    parser.add_argument("--warmup", type=int, default=50, help="first steps left out of the step time")
    parser.add_argument("recipes", nargs="*", default=["names-batched.yaml", "names-best.yaml"])
    args = parser.parse_args()
    print("| recipe | compile | ms/step (after warm-up) | process wall s |")
    print("| --- | --- | ---: | ---: |")
    for recipe in args.recipes:
        for compile_ in ("false", "true"):
            r = fit(recipe, args.accelerator, args.steps, "--model.compile", compile_, warmup=args.warmup)
            print(f"| {recipe} | {compile_} | {r['ms_per_step']:.2f} | {r['wall']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
