"""``microgpt export``: safetensors read back as the checkpoint, ONNX under onnxruntime, the page in Chromium."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.serving import headless_chromium, random_checkpoint

from microgpt.checkpoints.loading import load_model
from microgpt.commands import export as export_command
from microgpt.commands.sample import main as sample_main
from microgpt.model.names import sample_names

VOCAB = "abcdefghijklmnopqrstuvwxyz<\"'&\\ -"  # markup, quotes and a backslash: the page must carry them intact


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("export") / "model.ckpt", VOCAB, n_embd=16, n_head=2, n_layer=2,
                             block_size=8, seed=1)


def run_export(capsys, *args: str) -> tuple[int, str, str]:
    try:
        export_command.main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    for fmt in ("safetensors", "onnx", "html"):
        export_command.export(str(ckpt), fmt, str(out / fmt))
    return out


def test_every_format_writes_the_vocabulary_in_id_order_and_the_sizes(exported):
    for fmt in ("safetensors", "onnx", "html"):
        config = json.loads((exported / fmt / "config.json").read_text())
        assert "".join(config["vocab"]) == VOCAB and config["bos_id"] == len(VOCAB) == config["vocab_size"] - 1
        assert (config["n_embd"], config["n_head"], config["n_layer"], config["block_size"]) == (16, 2, 2, 8)
    assert sorted(p.name for p in (exported / "safetensors").iterdir()) == ["README.md", "config.json",
                                                                            "model.safetensors"]


def test_the_safetensors_folder_draws_what_the_checkpoint_draws_and_nothing_is_unpickled(exported, ckpt, capsys,
                                                                                        monkeypatch):
    folder = exported / "safetensors"
    gpt, tokenizer = load_model(ckpt)

    def refuse(*args, **kwargs):
        raise AssertionError("an exported folder was unpickled")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", refuse)
        patch.setattr(pickle, "load", refuse)
        patch.setattr(pickle, "loads", refuse)
        again, same = load_model(folder)
    assert same.chars == tokenizer.chars
    for (name, a), (_, b) in zip(gpt.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    drawn = []
    for path in (ckpt, folder):
        sample_main(["--ckpt_path", str(path), "--num_samples", "12", "--seed", "5", "--prefix", "a",
                     "--temperature", "0.9", "--top_p", "0.95"])
        drawn.append(capsys.readouterr().out.splitlines())
    assert drawn[0] == drawn[1] and len(drawn[0]) >= 12
    card = (folder / "README.md").read_text()
    assert "## Recipe" in card and "## Samples" in card


def test_onnx_logits_equal_torch_under_onnxruntime_for_any_batch_and_length(exported, ckpt):
    import onnxruntime

    gpt, _ = load_model(ckpt)
    session = onnxruntime.InferenceSession(str(exported / "onnx" / "model.onnx"))
    generator = torch.Generator().manual_seed(0)
    for batch, time in [(1, 1), (3, 5), (2, 8)]:
        ids = torch.randint(0, len(VOCAB) + 1, (batch, time), generator=generator)
        (logits,) = session.run(["logits"], {"ids": ids.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, gpt.eval()(ids).numpy(), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium()


def test_the_page_runs_offline_with_torchs_probabilities_and_greedy_name(exported, ckpt, browser):
    from selenium.webdriver.common.by import By

    page = (exported / "html" / "index.html").resolve()
    gpt, tokenizer = load_model(ckpt)
    gpt.eval()
    greedy = sample_names(gpt, tokenizer, 1, 1.0, 1, "a")[0]  # top_k 1: the likeliest character every time
    browser.get(f"{page.as_uri()}?prefix=a&count=3&temperature=0.001&seed=7&top_p=0.5")
    names = [li.get_attribute("textContent") for li in browser.find_elements(By.CSS_SELECTOR, "#names li")]
    assert names == [greedy] * 3
    for field in ("prefix", "count", "seed", "temperature", "top_p", "go", "copy"):
        assert browser.find_element(By.ID, field)  # the served page's controls
    for prefix in ["", "a", "<b\\'", "-&\" z-"]:  # up to a whole context (7 characters after the start)
        ids = torch.tensor([[tokenizer.bos, *tokenizer.encode(prefix)]])
        with torch.no_grad():
            expected = torch.softmax(gpt(ids)[0, -1].double(), -1).numpy()
        got = np.array(browser.execute_script("return microgpt.probabilities(arguments[0])", prefix))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    names = browser.execute_script("return microgpt.invent('', 50, 1.0, 1.0, 3)")
    assert len(names) == 50 and len(set(names)) > 10 and all(len(n) <= 8 for n in names)
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors  # nothing fetched, nothing blocked


def test_bad_exports_are_one_line_and_leave_nothing(ckpt, tmp_path, capsys, monkeypatch):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"PK\x03\x04 not really a checkpoint")
    cases = [(("--ckpt_path", str(junk), "--format", "html", "--output", str(tmp_path / "a")), "junk.ckpt: "),
             (("--ckpt_path", str(ckpt), "--format", "gguf", "--output", str(tmp_path / "b")), "--format gguf"),
             (("--ckpt_path", str(ckpt), "--format", "html", "--output", "/proc/microgpt-export"), "cannot write"),
             (("--ckpt_path", str(ckpt), "--format", "html", "--output", str(tmp_path / "no" / "c")), "does not exist")]
    for args, words in cases:
        code, _, err = run_export(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err
    # a write that fails half-way (a full disk) leaves no folder and no hidden work folder behind
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    code, _, err = run_export(capsys, "--ckpt_path", str(ckpt), "--format", "safetensors", "--output",
                                str(tmp_path / "d"))
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.ckpt"]


def test_a_damaged_exported_folder_is_one_sentence_naming_the_file(exported, tmp_path):
    import shutil

    from microgpt.errors import UserError

    for damage, words in [("model.safetensors", "model.safetensors: is damaged"),
                          ("config.json", "config.json: is damaged"), (None, "a folder without")]:
        folder = tmp_path / f"copy-{damage}"
        shutil.copytree(exported / "safetensors", folder)
        if damage is None:
            (folder / "model.safetensors").unlink()
        else:
            data = (folder / damage).read_bytes()
            (folder / damage).write_bytes(data[: len(data) // 2])
        with pytest.raises(UserError) as caught:
            load_model(folder)
        assert words in str(caught.value) and "\n" not in str(caught.value)
