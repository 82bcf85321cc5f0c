"""``python -m microgpt``: LightningCLI's fit/validate/test/predict, plus ``sample`` (argparse, no LightningCLI)."""

import sys


def main() -> None:
    if sys.argv[1:2] == ["sample"]:
        from microgpt.sample import main as sample_main

        sample_main(sys.argv[2:])
    else:
        from microgpt.cli import main as cli_main

        cli_main()


if __name__ == "__main__":
    main()
