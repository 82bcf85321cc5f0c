"""Helpers for the serve tests: a real ``microgpt serve`` subprocess on a free port, and plain-urllib HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import session_processes  # the benchmark reads the same processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MICROGPT_API_KEY"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def live_session_processes(sid: int) -> list[int]:
    """The pids of the live processes of session ``sid`` (the server, started in a new session, and all it
    started); ended ones not yet collected by their parent do not count."""
    return [p.pid for p in session_processes(sid) if p.state != "Z"]


class Server:
    """``microgpt serve --ckpt_path CKPT ARGS`` in a session of its own, its output in ``log``."""

    def __init__(self, ckpt: Path, log: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.started = time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "microgpt", "serve", "--ckpt_path", str(ckpt), "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, env=env or serve_env(), start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from the start until ``/health`` answered 200."""
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server was not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        """Stop it, and anything it left, whatever state it is in (fixture teardown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid in live_session_processes(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            method: str = "GET") -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def get(url: str) -> tuple[int, bytes]:
    status, body, _ = request(url)
    return status, body


def post(url: str, payload=None, raw: bytes | None = None, key: str | None = None) -> tuple[int, dict]:
    """POST ``payload`` as JSON (or ``raw`` bytes as they are); the status and the decoded JSON answer."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    body = raw if raw is not None else json.dumps(payload).encode()
    status, answer, _ = request(url, body, headers, "POST")
    return status, json.loads(answer)


def random_checkpoint(path: Path, vocab: str = "abcdefghijklmnopqrstuvwxyz", n_embd: int = 16, n_head: int = 2,
                      n_layer: int = 2, block_size: int = 8, seed: int = 0, end_bias: float = 0.0) -> Path:
    """A microgpt checkpoint file as ``fit`` writes one (format, sizes, vocabulary, ``gpt.`` weights) holding a
    GPT with weights drawn at a scale that gives sharply uneven probabilities, in no time; ``end_bias`` is
    added to the end token's output weights' first input, so that its rows run longer (negative) or shorter."""
    import torch

    from microgpt.checkpoints.io import FORMAT, FORMAT_KEY
    from microgpt.model.gpt import GPT

    torch.manual_seed(seed)
    gpt = GPT(len(vocab) + 1, n_embd=n_embd, n_head=n_head, n_layer=n_layer, block_size=block_size)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.25)
        gpt.lm_head.weight[len(vocab)] += end_bias
    sizes = {"n_embd": n_embd, "n_head": n_head, "n_layer": n_layer, "block_size": block_size, "dropout": 0.0}
    torch.save({FORMAT_KEY: FORMAT, "global_step": 0, "hyper_parameters": {**sizes, "vocab": vocab},
                "state_dict": {f"gpt.{k}": v for k, v in gpt.state_dict().items()}}, path)
    return path


def headless_chromium():
    """Headless Chromium from the system packages, driven by Selenium (a generator for a fixture); skipped only
    where it is not installed outside CI (.ci/run installs it, so CI never skips)."""
    import shutil

    import pytest

    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("the browser test needs chromium and chromium-driver, which .ci/run installs")
        pytest.skip("headless Chromium is not installed here")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()
