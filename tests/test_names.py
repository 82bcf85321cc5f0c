"""Names the way people use a name generator: a length range, only new names, no repeats, the likeliest names and
each name's log-probability; checked against exact probabilities found by enumeration, and through ``sample``,
``predict`` and ``serve``."""

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers.serving import ROOT, Server, headless_chromium, post, request

from microgpt.checkpoints.loading import load_model
from microgpt.commands.cli import main as cli_main
from microgpt.commands.sample import main as sample_main
from microgpt.data.datamodule import chunk_seed
from microgpt.data.known import KnownNames
from microgpt.model.gpt import GPT
from microgpt.model.names import NameOptions
from microgpt.model.names import invent as draw
from microgpt.model.sampling import likeliest
from microgpt.model.tokenizer import CharTokenizer

CONFIG = str(ROOT / "configs" / "names.yaml")
CHARS = "abc"
TOKENIZER = CharTokenizer(CHARS)
END = TOKENIZER.bos


def tiny_model(seed=0) -> GPT:
    """Three characters and a context of 6: every name the model can end (at most 5 characters) can be listed."""
    torch.manual_seed(seed)
    gpt = GPT(vocab_size=len(CHARS) + 1, n_embd=8, n_head=2, n_layer=1, block_size=6).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.25)
    return gpt


@torch.no_grad()
def enumerate_names(gpt, prefix: str, longest: int, temperature: float = 1.0) -> dict[str, float]:
    """Every name that starts with ``prefix`` and ends within ``longest`` characters, with the natural log of its
    probability given the prefix, end included: one full forward pass over ``[END] + name`` per name, the
    softmax at ``temperature`` read at every position after the prefix."""
    out = {}
    for length in range(len(prefix), longest + 1):
        rests = list(itertools.product(CHARS, repeat=length - len(prefix)))
        full = [prefix + "".join(rest) for rest in rests]
        x = torch.tensor([[END, *(CHARS.index(c) for c in name)] for name in full])
        logp = (gpt(x) / temperature).double().log_softmax(-1)
        targets = torch.cat([x[:, 1:], torch.full((len(full), 1), END)], dim=1)
        picked = logp.gather(-1, targets[:, :, None])[:, :, 0][:, len(prefix):]
        out.update(zip(full, picked.sum(1).tolist()))
    return out


def chi_square_p(observed: dict[str, int], probs: dict[str, float], n: int) -> float:
    """The p-value of Pearson's chi-square test of ``observed`` counts against ``probs``; cells expecting fewer
    than 5 draws are pooled."""
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for name, p in probs.items():
        expected = n * p
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed.get(name, 0), pooled_exp + expected
        else:
            cells.append((observed.get(name, 0), expected))
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    assert sum(o for o, _ in cells) == n, "a draw outside the distribution's support"
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return float(torch.special.gammaincc(torch.tensor((len(cells) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("prefix,low,high,temperature", [("", 2, 4, 1.0), ("b", 3, 5, 1.0), ("", 1, 3, 0.7)])
def test_length_range_draws_follow_the_models_conditional_distribution(prefix, low, high, temperature):
    gpt = tiny_model()
    exact = {name: lp for name, lp in enumerate_names(gpt, prefix, high, temperature).items() if low <= len(name)}
    total = math.fsum(math.exp(lp) for lp in exact.values())
    conditional = {name: math.exp(lp) / total for name, lp in exact.items()}
    n = 3000
    found = draw(gpt, TOKENIZER, NameOptions(n, prefix, temperature, min_length=low, max_length=high),
                 torch.Generator().manual_seed(1))
    assert found.shortfall is None and len(found.names) == n
    counts = {}
    for name in found.names:
        counts[name] = counts.get(name, 0) + 1
    assert chi_square_p(counts, conditional, n) > 1e-3
    # the log-probability that comes with each name is the model's own (temperature 1), end included
    plain = enumerate_names(gpt, prefix, high)
    for name, logprob in zip(found.names[:50], found.logprobs):
        assert logprob == pytest.approx(plain[name], abs=1e-4)


def test_masking_the_end_would_not_be_the_conditional_distribution():
    """Why the draws are turned down and drawn again rather than only masked: on this model, masking the end
    token before 2 characters gives single characters other shares than the conditional distribution does."""
    gpt = tiny_model()
    exact = enumerate_names(gpt, "", 4)
    kept = {name: math.exp(lp) for name, lp in exact.items() if 2 <= len(name)}
    total = sum(kept.values())
    first_exact = {c: sum(p for name, p in kept.items() if name[0] == c) / total for c in CHARS}
    with torch.no_grad():
        first = gpt(torch.tensor([[END]]))[0, -1, :len(CHARS)].softmax(-1).tolist()  # the masked first draw
    assert max(abs(first_exact[c] - first[i]) for i, c in enumerate(CHARS)) > 0.02


class ListedNames:
    """Known names from a list (the shape of ``KnownNames``)."""

    def __init__(self, names):
        self.names = set(names)

    def kind(self, name):
        return "training" if name in self.names else None


@pytest.mark.parametrize("prefix,low,high", [("", None, None), ("a", 3, 4), ("", 2, 5)])
def test_likeliest_equals_brute_force(prefix, low, high):
    gpt = tiny_model(2)
    exact = {name: lp for name, lp in enumerate_names(gpt, prefix, high or 5).items() if len(name) >= (low or 0)}
    ranked = sorted(exact.items(), key=lambda item: -item[1])
    found = draw(gpt, TOKENIZER, NameOptions(prefix=prefix, min_length=low, max_length=high, likeliest=25))
    assert found.names == [name for name, _ in ranked[:25]]
    assert found.logprobs == pytest.approx([lp for _, lp in ranked[:25]], abs=1e-5)
    # only new names: the known ones drop out and the next ones move up
    known = ListedNames(name for name, _ in ranked[:25:3])
    new = draw(gpt, TOKENIZER, NameOptions(prefix=prefix, min_length=low, max_length=high, likeliest=25,
                                           only_new=True), known=known)
    assert new.names == [name for name, _ in ranked if name not in known.names][:25]


def test_likeliest_says_when_fewer_names_exist():
    found = draw(tiny_model(), TOKENIZER, NameOptions(min_length=2, max_length=2, likeliest=12))
    assert sorted(found.names) == sorted(a + b for a in CHARS for b in CHARS)
    assert found.shortfall == "the model gives only 9 names that are of 2 characters a probability above zero."
    bounded = likeliest(tiny_model(), [END], END, 12, (2, 5), max_expanded=2)  # stops after its second read
    assert bounded.exhausted and len(bounded.tokens) < 12


def test_only_new_never_returns_a_known_name_and_unique_never_repeats():
    gpt = tiny_model()
    ranked = sorted(enumerate_names(gpt, "", 5).items(), key=lambda item: -item[1])
    known = ListedNames(name for name, _ in ranked[:15])  # the likeliest names: most draws would be known
    options = NameOptions(400, temperature=1.0)
    assert sum(name in known.names for name in draw(gpt, TOKENIZER, options, torch.Generator().manual_seed(0)).names) > 100
    options.only_new = True
    found = draw(gpt, TOKENIZER, options, torch.Generator().manual_seed(0), known)
    assert len(found.names) == 400 and not known.names & set(found.names)
    options = NameOptions(60, temperature=1.0, unique=True, max_length=5)
    found = draw(gpt, TOKENIZER, options, torch.Generator().manual_seed(0))
    assert len(set(found.names)) == 60
    short = draw(gpt, TOKENIZER, NameOptions(5, temperature=1.0, unique=True, min_length=1, max_length=1),
                 torch.Generator().manual_seed(0))
    assert sorted(short.names) == list(CHARS)
    assert short.shortfall == ("found only 3 of 5 names that are unique and of 1 character in 500 draws; "
                               "ask for fewer, or loosen the settings.")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A model trained for 5 steps on 30 names (2 held out), and the same checkpoint without its run's names."""
    tmp = tmp_path_factory.mktemp("names")
    names = tmp / "names.txt"
    listed = ["anna", "bob", "carla", "dave", "eve", "fiona", "greg", "hana", "ivan", "julia", "karl", "lena",
              "mona", "nils", "olga", "paul", "quinn", "rosa", "sven", "tina", "ada", "ben", "cora", "dina",
              "emil", "fred", "gina", "hugo", "ines", "jan"]
    names.write_text("\n".join(listed) + "\n")
    cli = cli_main(["--config", CONFIG, "--data.path", str(names), "--data.val_size", "2", "--trainer.max_steps", "5",
                    "--trainer.default_root_dir", str(tmp), "--trainer.enable_progress_bar", "false",
                    "--trainer.logger", "false"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = next(tmp.rglob("last.ckpt"))
    old = tmp / "old.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["NamesDataModule"]
    torch.save(checkpoint, old)
    held_out = set(cli.datamodule.split.store.decode(cli.datamodule.split.val_lines))
    return {"tmp": tmp, "names": names, "listed": listed, "held_out": held_out, "ckpt": ckpt, "old": old}


@torch.no_grad()
def logprob(gpt, tokenizer, name: str, prefix: str = "") -> float:
    """The natural log of the probability of ``name`` given ``prefix``, end included, by one full forward pass."""
    ids = [tokenizer.bos, *tokenizer.encode(name), tokenizer.bos]
    logp = gpt(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
    return sum(float(logp[i, ids[i + 1]]) for i in range(len(prefix), len(ids) - 1))


def test_the_checkpoint_knows_its_training_and_held_out_names(run):
    known = KnownNames.from_file(run["ckpt"])
    assert len(run["held_out"]) == 2
    for name in run["listed"]:
        assert known.kind(name) == ("held-out" if name in run["held_out"] else "training")
    for name in ("annа", "zed", "", "anna ", "ann"):
        assert known.kind(name) is None
    assert KnownNames.from_file(run["old"]) is None


def sample_lines(capsys, *args) -> list[str]:
    sample_main(["--ckpt_path", *map(str, args)])
    return capsys.readouterr().out.splitlines()


def test_each_option_from_the_command_line(run, capsys):
    ckpt, listed = run["ckpt"], set(run["listed"])
    gpt, tokenizer = load_model(ckpt)
    lines = sample_lines(capsys, ckpt, "--min_length", 3, "--max_length", 4, "--num_samples", 40, "--seed", 1,
                         "--show_logprob")
    assert len(lines) == 40
    for line in lines:
        name, value = line.split("\t")
        assert 3 <= len(name) <= 4 and float(value) == pytest.approx(logprob(gpt, tokenizer, name), abs=1e-3)
    new = sample_lines(capsys, ckpt, "--only_new", "--num_samples", 40, "--seed", 2, "--temperature", 0.3)
    assert len(new) == 40 and not listed & set(new)
    unique = sample_lines(capsys, ckpt, "--unique", "--num_samples", 40, "--seed", 3, "--max_length", 5)
    assert len(set(unique)) == 40 and all(len(name) <= 5 for name in unique)
    likeliest = [line.split("\t") for line in sample_lines(capsys, ckpt, "--likeliest", 6, "--prefix", "a",
                                                            "--max_length", 4)]
    assert len(likeliest) == 6 and all(name.startswith("a") and len(name) <= 4 for name, _ in likeliest)
    values = [float(value) for _, value in likeliest]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx([logprob(gpt, tokenizer, name, "a") for name, _ in likeliest], abs=1e-3)


@pytest.mark.parametrize("args,message", [
    (["--min_length", "5", "--max_length", "3"], "--min_length 5 is above --max_length 3."),
    (["--max_length", "8"], "--max_length 8 is beyond the model's context: it can end names of at most 7 characters"),
    (["--min_length", "9"], "--min_length 9 is beyond the model's context"),
    (["--likeliest", "1001"], "--likeliest is at most 1000, got 1001."),
    (["--likeliest", "0"], "--likeliest: must be a positive integer, got 0"),
    (["--prefix", "anna", "--max_length", "3"], "the prefix 'anna' is longer than --max_length 3."),
    (["OLD", "--only_new"], "--only_new needs the names of the run that made the checkpoint, and this checkpoint does"),
])
def test_bad_settings_are_one_line_and_exit_2(run, capsys, args, message):
    ckpt = str(run["old"]) if args[0] == "OLD" else str(run["ckpt"])
    with pytest.raises(SystemExit) as stop:
        sample_main(["--ckpt_path", ckpt, *(a for a in args if a != "OLD")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and message in err.splitlines()[-1]


def test_predict_takes_the_options_and_draws_what_sample_draws(run, capsys):
    tmp, ckpt = run["tmp"], run["ckpt"]
    cli_main(["predict", "--config", CONFIG, "--data.path", str(run["names"]), "--data.val_size", "2",
              "--ckpt_path", str(ckpt), "--data.predict_size", "12", "--data.predict_min_length", "3",
              "--data.predict_max_length", "5", "--data.predict_only_new", "true", "--data.predict_unique", "true",
              "--data.predict_show_logprob", "true", "--trainer.default_root_dir", str(tmp / "predict"),
              "--trainer.enable_progress_bar", "false"])
    lines = next((tmp / "predict").rglob("predictions.txt")).read_text().splitlines()
    written = [line.split("\t")[0] for line in lines]
    assert len(set(written)) == 12 and not set(run["listed"]) & set(written)
    assert all(3 <= len(name) <= 5 for name in written)
    assert "predictions: 100% new, " in capsys.readouterr().out
    # the same settings and seed (predict's one request is seeded from --seed_everything 42) in sample's API
    gpt, tokenizer = load_model(ckpt)
    options = NameOptions(12, "", 0.5, min_length=3, max_length=5, only_new=True, unique=True)
    same = draw(gpt, tokenizer, options, torch.Generator().manual_seed(chunk_seed(42, 0, 0)),
                KnownNames.from_file(ckpt))
    assert written == same.names
    with pytest.raises(SystemExit) as stop:
        cli_main(["predict", "--config", CONFIG, "--data.path", str(run["names"]), "--data.val_size", "2",
                  "--ckpt_path", str(run["old"]), "--data.predict_only_new", "true",
                  "--trainer.default_root_dir", str(tmp / "predict"), "--trainer.enable_progress_bar", "false"])
    assert stop.value.code == 2
    assert "--data.predict_only_new needs the names" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(run):
    server = Server(run["ckpt"], run["tmp"] / "serve.log", "--max_batch_size", "8", "--batch_timeout", "0.05")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_serve_takes_the_options_and_draws_what_sample_draws(run, server):
    url = server.url + "/predict"
    gpt, tokenizer = load_model(run["ckpt"])
    known = KnownNames.from_file(run["ckpt"])
    mine = {"count": 8, "seed": 5, "min_length": 3, "max_length": 5, "only_new": True, "unique": True}
    expected = draw(gpt, tokenizer, NameOptions(8, "", 0.5, min_length=3, max_length=5, only_new=True, unique=True),
                    torch.Generator().manual_seed(5), known)
    status, body = post(url, mine)
    assert status == 200 and body["names"] == expected.names and body["kinds"] == ["new"] * 8
    assert body["logprobs"] == pytest.approx(expected.logprobs, abs=1e-4)
    others = [{"count": 5, "prefix": "a"}, {"count": 3, "max_length": 4, "seed": 1}, {"likeliest": 3}]
    with ThreadPoolExecutor(8) as pool:  # the same request in the middle of a batch
        answers = list(pool.map(lambda body: post(url, body), [*others, mine, *others]))
    assert answers[len(others)] == (200, body)
    # streamed, a name is sent once kept: the same names, in the same order, each with its log-probability
    status, lines, headers = request(url, json.dumps({**mine, "stream": True}).encode(),
                                     {"Content-Type": "application/json"}, "POST")
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in lines.decode().splitlines()]
    assert [line["name"] for line in lines] == body["names"] and {line["kind"] for line in lines} == {"new"}
    assert [line["logprob"] for line in lines] == pytest.approx(body["logprobs"], abs=1e-6)
    short = {"prefix": "ann", "max_length": 4, "only_new": True, "unique": True, "count": 50, "seed": 2}
    status, answer = post(url, short)
    _, lines, _ = request(url, json.dumps({**short, "stream": True}).encode(), {"Content-Type": "application/json"},
                          "POST")
    lines = [json.loads(line) for line in lines.decode().splitlines()]
    assert "found only" in answer["message"] and lines[-1] == {"message": answer["message"]}
    assert [line["name"] for line in lines[:-1]] == answer["names"]
    status, body = post(url, {"likeliest": 4, "prefix": "a", "max_length": 4})
    likeliest = draw(gpt, tokenizer, NameOptions(prefix="a", max_length=4, likeliest=4))
    assert status == 200 and body["names"] == likeliest.names
    assert body["kinds"] == [known.kind(name) or "new" for name in likeliest.names]
    for bad, loc, words in [({"min_length": 5, "max_length": 3}, "min_length", "is above max_length 3"),
                            ({"max_length": 8}, "max_length", "beyond the model's context"),
                            ({"likeliest": 0}, "likeliest", "greater than or equal to 1"),
                            ({"likeliest": 1001}, "likeliest", "less than or equal to 1000"),
                            ({"prefix": "anna", "max_length": 2}, "max_length", "longer than max_length 2"),
                            ({"only_new": 1}, "only_new", "boolean")]:
        status, answer = post(url, bad)
        assert status == 422 and answer["detail"][0]["loc"] == ["body", loc] and words in answer["detail"][0]["msg"]
        assert post(url, {"count": 2})[0] == 200


@pytest.fixture
def browser():
    yield from headless_chromium()


def test_the_page_offers_the_options_and_marks_each_name(run, server, browser):
    """Headless Chromium (as in test_serve.py): the page sends the options and marks each name as the server's
    answer says, leaving the name's own text alone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    for field, value in (("count", "6"), ("seed", "5"), ("min_length", "3"), ("max_length", "5")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "only_new").click()
    browser.find_element(By.ID, "go").click()
    items = lambda: browser.find_elements(By.CSS_SELECTOR, "#names li")
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "status").text == "6 names")
    _, body = post(server.url + "/predict", {"count": 6, "seed": 5, "min_length": 3, "max_length": 5,
                                             "only_new": True, "temperature": 0.5})
    assert [li.get_attribute("textContent") for li in items()] == body["names"]
    assert [li.get_attribute("data-kind") for li in items()] == ["new"] * 6
    # every name of 3 or 4 characters that starts with "ann" (fewer than asked for): "anna" among them
    browser.find_element(By.ID, "only_new").click()
    for field, value in (("prefix", "ann"), ("max_length", "4"), ("likeliest", "30")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 20).until(lambda b: "a probability above zero" in b.find_element(By.ID, "status").text)
    _, body = post(server.url + "/predict", {"prefix": "ann", "likeliest": 30, "min_length": 3, "max_length": 4})
    assert [li.get_attribute("textContent") for li in items()] == body["names"]
    assert [li.get_attribute("data-kind") for li in items()] == body["kinds"]
    assert len(body["names"]) == len(load_model(run["ckpt"])[1].chars) + 1
    assert body["kinds"][body["names"].index("anna")] == KnownNames.from_file(run["ckpt"]).kind("anna")


def test_the_sampling_callback_takes_the_options(tiny_names, tmp_path, capsys):
    import lightning as L

    from microgpt.callbacks import SampleNames
    from microgpt.data.datamodule import NamesDataModule
    from microgpt.errors import UserError
    from microgpt.training.module import MicroGPT

    def fit(callback, root):
        dm = NamesDataModule(path=str(tiny_names), val_size=2)
        trainer = L.Trainer(max_steps=3, default_root_dir=root, callbacks=[callback], enable_progress_bar=False,
                            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(MicroGPT(dm.vocab), datamodule=dm)
        return trainer

    trainer = fit(SampleNames(num_samples=10, min_length=3, max_length=4, unique=True, only_new=True, seed=1), tmp_path)
    drawn = (Path(trainer.log_dir) / "samples.txt").read_text().splitlines()
    assert len(set(drawn)) == 10 and all(3 <= len(name) <= 4 for name in drawn)
    assert not set(tiny_names.read_text().split()) & set(drawn)
    with pytest.raises(UserError, match="max_length 8 is beyond the model's context"):
        fit(SampleNames(max_length=8), tmp_path / "bad")
