"""``microgpt export``: a trained model as a folder other tools read, and a single web page that runs it offline.

``microgpt export --ckpt_path best|last|FILE|DIR --format safetensors|onnx|html --output DIR [--root_dir D]``

Every format writes ``DIR/config.json`` (``vocab``: the characters in id order, ``bos_id``: the token that starts
and ends a name, and the model's sizes) and beside it:

* ``safetensors``: ``model.safetensors`` (the GPT's weights by their PyTorch names) and a ``README.md`` model card.
  ``sample``, ``serve`` and ``load_model`` take the folder as a checkpoint; nothing in it is unpickled.
* ``onnx``: ``model.onnx``, the forward pass: token ids ``ids`` (batch x time, both dynamic, time at most
  ``block_size``) in, ``logits`` (batch x time x vocab) out.
* ``html``: ``index.html``, one file with the weights inside that invents names in a browser, offline.

The folder is written beside ``DIR`` under a hidden name and renamed into place when whole: it appears complete
or not at all. Torch only (onnx: the ``onnx`` package), no Lightning.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

import torch

from microgpt.checkpoints.io import load_checkpoint
from microgpt.checkpoints.loading import CONFIG, WEIGHTS, load_model
from microgpt.commands.sample import resolve
from microgpt.errors import UserError
from microgpt.model.gpt import GPT, RMS_EPS
from microgpt.model.names import sample_names
from microgpt.model.tokenizer import CharTokenizer

FORMATS = ("safetensors", "onnx", "html")
CARD_SAMPLES = 10


def config(gpt: GPT, tokenizer: CharTokenizer, fmt: str) -> dict:
    """What a reader needs to rebuild the model around its weights."""
    attn = gpt.blocks[0].attn
    return {"model_type": "microgpt", "format": fmt, "vocab": list(tokenizer.chars), "bos_id": tokenizer.bos,
            "vocab_size": tokenizer.vocab_size, "n_embd": gpt.wte.embedding_dim, "n_head": attn.n_head,
            "n_layer": len(gpt.blocks), "block_size": gpt.block_size, "rms_eps": RMS_EPS}


def weights(gpt: GPT) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in gpt.state_dict().items()}


def write_safetensors(gpt: GPT, tokenizer: CharTokenizer, folder: Path, source: str) -> None:
    from safetensors.torch import save_file

    save_file(weights(gpt), folder / WEIGHTS, metadata={"format": "pt"})
    (folder / "README.md").write_text(model_card(gpt, tokenizer, source), encoding="utf-8")


def model_card(gpt: GPT, tokenizer: CharTokenizer, source: str) -> str:
    """A short README: what the model is, how it was trained and on what, how well, and a few of its names."""
    hparams, data, step, score = {}, {}, None, None
    if not Path(source).is_dir():
        checkpoint = load_checkpoint(source)
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        data = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
        step = checkpoint.get("global_step")
        for state in (checkpoint.get("callbacks") or {}).values():
            if isinstance(state, dict) and state.get("best_model_score") is not None:
                score = float(state["best_model_score"])
    names = sample_names(gpt.eval(), tokenizer, CARD_SAMPLES, 0.5, generator=torch.Generator().manual_seed(0))
    parameters = sum(p.numel() for p in gpt.parameters())
    recipe = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in hparams.items() if k != "vocab") or "| (unknown) | |"
    source_data = data.get("path") or "the bundled names (microgpt/data/names.txt)"
    metrics = (f"- trained for {step} optimizer steps\n" if step is not None else "") + (
        f"- best validation loss: {score:.4f} nats per character\n" if score is not None else "")
    return f"""# microgpt character-level name model

A small GPT ({parameters:,} parameters: {config(gpt, tokenizer, '')['n_layer']} layer(s), width
{gpt.wte.embedding_dim}, context {gpt.block_size}) that invents names one character at a time, exported from
`{Path(source).name}` by `microgpt export`.

## Files
- `model.safetensors`: the weights, by the names of `microgpt.model.gpt.GPT`'s parameters.
- `config.json`: `vocab` (the {len(tokenizer.chars)} characters in id order), `bos_id` ({tokenizer.bos}, which
  starts and ends every name) and the sizes.

## Use
    microgpt sample --ckpt_path THIS_FOLDER
    microgpt serve --ckpt_path THIS_FOLDER
    from microgpt.checkpoints.loading import load_model; gpt, tokenizer = load_model("THIS_FOLDER")

## Recipe
| setting | value |
|---|---|
{recipe}

## Data
{source_data}{f", {data.get('val_size')} names held out for validation" if data.get('val_size') else ""}.

## Metrics
{metrics or "- not recorded in the checkpoint" + chr(10)}
## Samples (temperature 0.5, seed 0)
{", ".join(names)}
"""


def rms_norm_symbolic(g, x, shape, weight, eps):
    """ONNX for ``F.rms_norm`` over the last axis with no gain, which torch's exporter lacks at opset 18."""
    axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.long))
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1)
    return g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(RMS_EPS)))))


class Logits(torch.nn.Module):
    """The forward pass alone (no cache): token ids (B, T) to logits (B, T, V)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(ids)


def write_onnx(gpt: GPT, folder: Path) -> None:
    import warnings

    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ModuleNotFoundError:
        raise UserError("--format onnx needs the onnx package: pip install 'microgpt[export]'.") from None
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", rms_norm_symbolic, 18)
    example = torch.zeros(2, min(3, gpt.block_size), dtype=torch.long)
    with warnings.catch_warnings():  # the tracer's note that the block_size check is fixed at export
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(gpt.eval()), (example,), str(folder / "model.onnx"), dynamo=False, opset_version=18,
                          input_names=["ids"], output_names=["logits"],
                          dynamic_axes={"ids": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}})


def write_html(gpt: GPT, tokenizer: CharTokenizer, folder: Path) -> None:
    model = {"config": config(gpt, tokenizer, "html"), "weights": {
        name: {"shape": list(t.shape), "data": base64.b64encode(t.float().numpy().astype("<f4").tobytes()).decode()}
        for name, t in weights(gpt).items()}}
    template = (files("microgpt.commands") / "export.html").read_text(encoding="utf-8")
    # inside a <script>, "</" could end it: JSON lets every "<" be written \u003c
    page = template.replace("/*MODEL*/null", json.dumps(model).replace("<", "\\u003c"))
    (folder / "index.html").write_text(page, encoding="utf-8")


def export(ckpt_path: str, fmt: str, output: str) -> Path:
    """Write the export of ``ckpt_path`` in ``fmt`` to the new folder ``output``, whole or not at all."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: export writes {', '.join(FORMATS)}.")
    target = Path(output)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(f"--output {output}: already exists and is not an empty folder; pass a new folder.")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise UserError(f"--output {output}: its parent folder {parent} does not exist.")
    gpt, tokenizer = load_model(ckpt_path)
    gpt.eval()
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    except OSError as err:
        raise UserError(f"--output {output}: cannot write in {parent} ({err.strerror}).") from None
    try:
        (work / CONFIG).write_text(json.dumps(config(gpt, tokenizer, fmt), indent=2) + "\n", encoding="utf-8")
        if fmt == "safetensors":
            write_safetensors(gpt, tokenizer, work, ckpt_path)
        elif fmt == "onnx":
            write_onnx(gpt, work)
        else:
            write_html(gpt, tokenizer, work)
        mask = current_umask()  # mkdtemp and safetensors make private files: give them the usual modes
        os.chmod(work, 0o777 & ~mask)
        for written in work.iterdir():
            os.chmod(written, 0o666 & ~mask)
        if target.exists():
            target.rmdir()
        os.rename(work, target)
    except OSError as err:
        raise UserError(f"--output {output}: could not be written ({err.strerror or err}); nothing was left.") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="microgpt export", description="Export a trained model: safetensors "
                                     "weights and a model card, an ONNX forward pass, or one offline web page.")
    parser.add_argument("--ckpt_path", required=True,
                        help="checkpoint written by fit, or 'last' / 'best' for the newest run's under --root_dir")
    parser.add_argument("--root_dir", default=".", help="where --ckpt_path last / best look for runs (default .)")
    parser.add_argument("--format", required=True, help="safetensors, onnx or html")
    parser.add_argument("--output", required=True, help="the folder to create (it must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        target = export(resolve(args.ckpt_path, args.root_dir), args.format, args.output)
    except UserError as err:
        if os.environ.get("MICROGPT_DEBUG"):
            raise
        print(f"microgpt export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    written = ", ".join(sorted(p.name for p in target.iterdir()))
    print(f"microgpt export: wrote {target}/ ({written})")
