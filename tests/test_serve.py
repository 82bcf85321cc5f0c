"""``microgpt serve``: the real server as a subprocess on a free port, spoken to over HTTP."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers.serving import ROOT, Server, get, headless_chromium, live_session_processes, post, serve_env

from microgpt.checkpoints.loading import load_model
from microgpt.commands.cli import main as cli_main
from microgpt.model.names import sample_names

CONFIG = str(ROOT / "configs" / "names.yaml")
KEY = "s3cret-key"
MARKUP_NAMES = ["<b>anna</b>", "<script>bob</script>", "<i>carla</i>", "dave<br>", "<b>eve</b>", "fiona",
                "<script>alert(1)</script>", "mara", "<img src=x onerror=alert(1)>", "maja"]


def fit(root: Path, *args: str) -> Path:
    """Train a small model for 30 steps in this process; its last checkpoint."""
    cli = cli_main(["--config", CONFIG, "--trainer.max_steps", "30", "--trainer.default_root_dir", str(root),
                    "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *args], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return next(root.rglob("last.ckpt"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A names model (the bundled names) and one trained on lines full of markup (context 16)."""
    tmp = tmp_path_factory.mktemp("serve")
    markup = tmp / "markup.txt"
    markup.write_text("\n".join(MARKUP_NAMES * 3) + "\n", encoding="utf-8")
    return {"names": fit(tmp / "names"),
            "markup": fit(tmp / "markup", "--data.path", str(markup), "--data.val_size", "2",
                          "--model.block_size", "16"),
            "tmp": tmp}


@pytest.fixture(scope="module")
def servers(models):
    """Started together: the names model behind an API key (from the environment) with batching, and the
    markup model, open, for the page."""
    tmp = models["tmp"]
    keyed = Server(models["names"], tmp / "keyed.log", "--max_batch_size", "16", "--batch_timeout", "0.02",
                   env=serve_env(MICROGPT_API_KEY=KEY))
    page = Server(models["markup"], tmp / "page.log")
    try:
        keyed.startup = keyed.wait_ready()
        page.startup = page.wait_ready()
        yield {"keyed": keyed, "page": page}
    finally:
        keyed.stop()
        page.stop()


def test_predict_draws_what_sample_draws(servers, models):
    url = servers["keyed"].url + "/predict"
    status, body = post(url, {"count": 6, "prefix": "ma", "temperature": 0.8, "top_p": 0.9, "seed": 3}, key=KEY)
    assert status == 200
    gpt, tokenizer = load_model(models["names"])
    assert body["names"] == sample_names(gpt, tokenizer, 6, 0.8, None, "ma", torch.Generator().manual_seed(3), 0.9)
    status, body = post(url, {"top_k": 3, "seed": 4}, key=KEY)  # every field optional: 10 names at 0.5
    assert status == 200
    assert body["names"] == sample_names(gpt, tokenizer, 10, 0.5, 3, "", torch.Generator().manual_seed(4))


BAD_PREDICTS = [
    (None, b'{"count": 5,', 422, ["body"], "JSON"),
    (None, b"[1, 2]", 422, ["body"], "dictionary"),
    (None, b"", 422, ["body"], "JSON object"),
    ({"count": "5"}, None, 422, ["body", "count"], "integer"),
    ({"count": 0}, None, 422, ["body", "count"], "greater than or equal to 1"),
    ({"count": 1001}, None, 422, ["body", "count"], "less than or equal to 1000"),
    ({"prefix": 12}, None, 422, ["body", "prefix"], "string"),
    ({"prefix": "abcdefgh"}, None, 422, ["body", "prefix"], "holds 7 after the start token"),
    ({"prefix": "mA<"}, None, 422, ["body", "prefix"], "never seen: 'A<'"),
    ({"temperature": 0}, None, 422, ["body", "temperature"], "greater than or equal to 0.001"),
    ({"temperature": -1.5}, None, 422, ["body", "temperature"], "greater than or equal to 0.001"),
    ({"temperature": 101}, None, 422, ["body", "temperature"], "less than or equal to 100"),
    ({"stream": "yes"}, None, 422, ["body", "stream"], "boolean"),
    (None, b'{"temperature": NaN}', 422, ["body", "temperature"], "finite"),
    ({"top_p": 0}, None, 422, ["body", "top_p"], "greater than 0"),
    ({"top_p": 1.01}, None, 422, ["body", "top_p"], "less than or equal to 1"),
    ({"top_k": 0}, None, 422, ["body", "top_k"], "greater than or equal to 1"),
    ({"top_k": 2.5}, None, 422, ["body", "top_k"], "integer"),
    ({"seed": "x"}, None, 422, ["body", "seed"], "integer"),
    ({"cuont": 3}, None, 422, ["body", "cuont"], "Extra inputs"),
    (None, b'{"prefix": "\\ud800"}', 422, ["body", "prefix"], "never seen"),
    (None, b'{"count": "\\ud800"}', 422, ["body", "count"], "integer"),
]


@pytest.mark.parametrize("payload,raw,status,loc,words", BAD_PREDICTS)
def test_bad_predict_is_a_4xx_naming_the_field_and_the_server_keeps_serving(servers, payload, raw, status, loc, words):
    url = servers["keyed"].url + "/predict"
    got, body = post(url, payload, raw=raw, key=KEY)
    assert got == status
    assert any(e["loc"][: len(loc)] == loc and words in e["msg"] for e in body["detail"]), body
    assert post(url, {"count": 2, "prefix": "ka"}, key=KEY)[0] == 200


def test_oversized_body_missing_or_wrong_key_and_bad_score(servers):
    url = servers["keyed"].url
    status, body = post(url + "/score", {"names": ["a" * 1_100_000]}, key=KEY)
    assert status == 413 and "too large" in body["detail"]
    assert post(url + "/score", {"names": ["a" * 101]}, key=KEY)[0] == 422  # over 100 characters
    # the most the schema allows, every character escaped to 6 bytes (600 KB), is under the 1 MiB limit
    most = ('{"names": [' + ", ".join(['"' + "\\u0061" * 100 + '"'] * 1000) + "]}").encode()
    assert post(url + "/score", raw=most, key=KEY)[0] == 200
    for key in (None, "wrong"):
        for path in ("/predict", "/score"):
            status, body = post(url + path, {"names": ["emma"]} if path == "/score" else {}, key=key)
            assert status == 401 and "API key" in body["detail"]
    status, body = post(url + "/score", {"names": ["emma", "x Q!"]}, key=KEY)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "names", 1] and "' Q!'" in body["detail"][0]["msg"]
    for bad, loc in [({"names": []}, ["body", "names"]), ({"names": "emma"}, ["body", "names"]), ({}, ["body", "names"]),
                     ({"names": ["emma", 3]}, ["body", "names", 1])]:
        status, body = post(url + "/score", bad, key=KEY)
        assert status == 422 and body["detail"][0]["loc"] == loc
    assert post(url + "/predict", {"count": 1}, key=KEY)[0] == 200
    assert get(url + "/health") == (200, b"ok")  # health and the page need no key
    assert get(url + "/")[0] == 200


def test_200_requests_from_16_threads_each_keep_their_prefix(servers):
    url = servers["keyed"].url + "/predict"
    prefixes = ["", "a", "ma", "jo", "el", "kar", "b", "z"]
    rng = random.Random(0)
    asks = [{"count": rng.randint(1, 12), "prefix": rng.choice(prefixes), "temperature": rng.choice([0.5, 1.0, 1.5]),
             "top_k": rng.choice([None, 3]), "top_p": rng.choice([None, 0.8])} for _ in range(200)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda ask: post(url, ask, key=KEY), asks))
    assert all(status == 200 for status, _ in answers)
    for ask, (_, body) in zip(asks, answers):
        assert len(body["names"]) == ask["count"]
        assert all(name.startswith(ask["prefix"]) for name in body["names"])


def test_a_seed_gives_the_same_names_whatever_else_is_in_the_batch(servers):
    url = servers["keyed"].url + "/predict"
    seeded = {"count": 8, "prefix": "ka", "temperature": 1.2, "top_k": 5, "top_p": 0.95, "seed": 11}
    alone = post(url, seeded, key=KEY)
    others = [{"count": n, "prefix": p, "temperature": t} for n, p, t in
              [(30, "", 2.0), (1, "zz", 0.3), (12, "abc", 1.0), (5, "b", 0.7), (20, "", 1.5), (3, "mar", 0.9)]]
    with ThreadPoolExecutor(8) as pool:
        mixed = [pool.submit(post, url, ask, None, KEY) for ask in [*others[:3], seeded, *others[3:], seeded]]
        results = [m.result() for m in mixed]
    assert alone[0] == 200 and all(status == 200 for status, _ in results)
    assert results[3][1]["names"] == alone[1]["names"] == results[-1][1]["names"]
    assert post(url, {**seeded, "seed": 12}, key=KEY)[1]["names"] != alone[1]["names"]


def test_score_is_what_test_scores(servers, models, tmp_path):
    from lightning import Trainer

    from microgpt.data.datamodule import NamesDataModule
    from microgpt.training.module import MicroGPT

    names = ["emma", "olivia", "xqzvw", "ava", "maximiliana", "zo"]  # one longer than the context: both cut it
    status, body = post(servers["keyed"].url + "/score", {"names": names}, key=KEY)
    assert status == 200 and len(body["nll"]) == len(names)
    assert body["nll"][2] > body["nll"][0]  # an unlikely name costs more
    test_file = tmp_path / "test.txt"
    test_file.write_text("\n".join(names) + "\n")
    model = MicroGPT.load_from_checkpoint(models["names"])
    dm = NamesDataModule(test_path=str(test_file), block_size=model.hparams.block_size, eval_batch_size=4)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    test_loss = trainer.test(model, datamodule=dm, verbose=False)[0]["test/loss"]
    predicted = [min(len(n) + 1, model.hparams.block_size) for n in names]  # characters predicted, the end included
    weighted = sum(nll * n for nll, n in zip(body["nll"], predicted)) / sum(predicted)
    assert weighted == pytest.approx(test_loss, abs=1e-5)


def test_port_in_use_and_a_broken_checkpoint_are_one_line_before_anything_listens(servers, models, tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "microgpt", "serve", *args], check=False, capture_output=True,
                              text=True, env=serve_env(), timeout=120)

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    with ThreadPoolExecutor(2) as pool:
        busy, broken = pool.map(lambda args: serve(*args), [("--ckpt_path", str(models["names"]), "--port",
                                                            str(servers["keyed"].port)), ("--ckpt_path", str(junk))])
    for result, words in [(busy, "Address already in use"), (broken, "junk.ckpt: ")]:
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr
        assert "http://" not in result.stdout  # it never got as far as announcing an address


def test_without_litserve_serve_says_what_to_install():
    code = ("import sys; sys.modules['litserve'] = None; sys.argv = ['microgpt', 'serve', '--ckpt_path', 'x']; "
            "from microgpt.__main__ import main; main()")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            env=serve_env(), timeout=60)
    assert result.returncode == 2
    expected = "microgpt serve: error: serving needs LitServe: pip install 'litserve>=0.2.19'"
    assert result.stderr.strip().splitlines() == [expected]


def test_serving_never_imports_lightning(models):
    """What the serving processes run, in a fresh interpreter: build the server, and do a worker's work."""
    code = f"""
import json, sys
from microgpt.commands.serve import build_server
from microgpt.commands.serve_apis import PredictAPI, ScoreAPI
from microgpt.commands.serve_http import PredictBody, ScoreBody
build_server({str(models['names'])!r}, "cpu", None, 4, 0.0)
api = PredictAPI({str(models['names'])!r}, None, 4, 0.0, "/predict")
api.setup("cpu")
lines = "".join(p[0] for p in api.encode_response(api.predict([api.decode_request(PredictBody(count=3, prefix="a"))])))
print("".join(json.loads(line)["data"] for line in lines.splitlines()[1:]))  # after the head line, the framed body
alone = PredictAPI({str(models['names'])!r}, None, 1, 0.0, "/predict")  # unbatched: LitServe hands over one request
alone.setup("cpu")
lines = "".join(alone.encode_response(alone.predict(alone.decode_request(PredictBody(count=3, prefix="a")))))
print("".join(json.loads(line)["data"] for line in lines.splitlines()[1:]))
score = ScoreAPI({str(models['names'])!r}, None, 1, 0.0, "/score")
score.setup("cpu")
print(score.encode_response(score.predict(score.decode_request(ScoreBody(names=["emma"])))))
print(sorted(m for m in sys.modules if m.split(".")[0] == "lightning" or m.startswith("pytorch_lightning")))
"""
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            env=serve_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith('{"names": ["a') and lines[1].startswith('{"names": ["a')
    assert len(json.loads(lines[1])["names"]) == 3 and lines[2].startswith("{'nll': [")
    assert lines[-1] == "[]"


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium()


def invent(browser, prefix: str, count: int = 12) -> list[str]:
    """Type ``prefix`` and ``count`` into the page, click the button, and read the names it lists."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    old = browser.find_elements(By.CSS_SELECTOR, "#names li")
    for field, value in (("prefix", prefix), ("count", str(count))):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#names li") and (
        not old or old[0] not in b.find_elements(By.CSS_SELECTOR, "#names li"))
        and b.find_element(By.ID, "status").text == f"{count} names")  # streamed: every name has arrived
    return [li.get_attribute("textContent") for li in browser.find_elements(By.CSS_SELECTOR, "#names li")]


def test_the_page_invents_names_with_the_typed_prefix_and_copies_them(servers, browser):
    from selenium.webdriver.common.by import By

    url = servers["page"].url + "/"
    browser.get(url)
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": servers["page"].url,
                                                          "permissions": ["clipboardReadWrite"]})
    names = invent(browser, "ma", 12)
    assert len(names) == 12 and all(name.startswith("ma") for name in names)
    browser.find_element(By.ID, "copy").click()
    copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0](''))")
    assert copied == "".join(f"{name}\n" for name in names)
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors  # nothing blocked by the page's Content-Security-Policy, nothing failed to load


@pytest.mark.parametrize("prefix", ["<script>", "<b>", "<img src"])
def test_names_full_of_markup_are_shown_as_text(servers, browser, prefix):
    browser.get(servers["page"].url + "/")
    names = invent(browser, prefix, 20)
    assert len(names) == 20 and all(name.startswith(prefix) for name in names)
    injected = browser.execute_script(
        "return [document.querySelectorAll('#names *:not(li), #names li *').length, document.scripts.length,"
        " document.querySelectorAll('b, img').length]")
    assert injected == [0, 1, 0]  # no element from a name; the page's own script only


def test_the_page_asks_for_the_api_key_when_the_server_needs_one(servers, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(servers["keyed"].url + "/")
    assert not browser.find_element(By.ID, "api_key").is_displayed()
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "api_key").is_displayed())
    assert "API key" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "api_key").send_keys(KEY)
    assert all(name.startswith("jo") for name in invent(browser, "jo", 5))


def test_sigterm_and_ctrl_c_stop_the_servers_and_every_process_they_started(servers):
    """Last in this file: it stops the module's two servers, the keyed one by SIGTERM to its main process (as
    ``kill`` or a container stop sends it), the other by SIGINT to its whole process group (as Ctrl-C does)."""
    keyed, page = servers["keyed"], servers["page"]
    for server in (keyed, page):
        assert len(live_session_processes(server.proc.pid)) >= 4  # itself, its HTTP process, two inference workers
    start = time.monotonic()
    keyed.proc.send_signal(signal.SIGTERM)
    os.killpg(page.proc.pid, signal.SIGINT)
    codes = [keyed.proc.wait(10), page.proc.wait(10)]
    while any(live_session_processes(s.proc.pid) for s in (keyed, page)) and time.monotonic() - start < 5:
        time.sleep(0.05)
    assert not any(live_session_processes(s.proc.pid) for s in (keyed, page)), "processes were left behind"
    assert time.monotonic() - start < 5
    assert codes == [0, 0]
    for server in (keyed, page):
        assert "Traceback" not in server.output() and server.output().strip().endswith("microgpt serve: stopped.")
