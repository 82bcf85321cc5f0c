"""Load on ``microgpt serve``: C concurrent clients sending 10-name requests, with batching and without, with
one inference worker or more, answered whole or streamed.

    python benchmarks/serve_load.py --ckpt_path best --root_dir runs/names-batched
    python benchmarks/serve_load.py --ckpt_path best --root_dir runs/names-batched --workers 1 2 --modes json stream

For each server setting (``--max_batch_size`` 64 and 1, each ``--workers_per_device`` of ``--workers``) it starts
the real server, times the command to the first ``GET /health`` that answers 200, warms it up, and then for
C = 1, 8, 32 client threads (each with its own keep-alive connection) and each mode (``json``: the whole answer;
``stream``: ``"stream": true``, read line by line) sends the requests and reports requests/s, names/s, p50/p99
latency, the p50 latency to the first name, the failures, and the CPU the clients and the server used (client and
server share the machine). The server's resident memory (all its processes) is read before the first level and
after the last. It ends with the goals, each met or not.
"""

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ["", "", "a", "ma", "jo", "el", "k", "sa", "b", "li"]
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class SessionProcess(NamedTuple):
    """One process of a session, as ``/proc/PID/stat`` shows it."""

    pid: int
    state: str  # R, S, D, ...; Z: it has ended and its parent has not yet collected it
    cpu_seconds: float
    rss_bytes: int


def session_processes(sid: int) -> list[SessionProcess]:
    """Every process of session ``sid`` (a server started in a new session, and all it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields: state, ppid, pgrp, session, ...
        if int(fields[3]) == sid:
            found.append(SessionProcess(int(entry.name), fields[0], (int(fields[11]) + int(fields[12])) / TICKS,
                                        int(fields[21]) * PAGE))
    return found


def server_cpu(sid: int) -> float:
    return sum(p.cpu_seconds for p in session_processes(sid))


def server_rss(sid: int) -> int:
    return sum(p.rss_bytes for p in session_processes(sid))


def start_server(ckpt: str, root_dir: str, port: int, max_batch_size: int, batch_timeout: float,
                 workers: int = 1) -> tuple:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MICROGPT_API_KEY", None)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "microgpt", "serve", "--ckpt_path", ckpt, "--root_dir", root_dir,
                             "--port", str(port), "--max_batch_size", str(max_batch_size),
                             "--batch_timeout", str(batch_timeout), "--workers_per_device", str(workers)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.02)


def run_clients(port: int, clients: int, requests: int, count: int, seed: int, stream: bool = False) -> dict:
    """``requests`` POST /predict spread over ``clients`` threads (``stream``: streamed, read a line at a time);
    latencies in seconds (to the whole answer, and to its first name) and failures."""
    latencies, firsts, failures, lock = [], [], [], threading.Lock()
    share = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, first = [], []
        for _ in range(share[i]):
            ask = {"count": count, "prefix": rng.choice(PREFIXES), "temperature": 0.8}
            body = json.dumps({**ask, "stream": True} if stream else ask)
            t = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                if stream and response.status == 200:
                    line = response.readline()
                    first.append(time.perf_counter() - t)
                    answer = line + response.read()
                    ok = len([json.loads(x)["name"] for x in answer.splitlines() if x]) == count
                else:
                    answer = response.read()
                    first.append(time.perf_counter() - t)
                    ok = response.status == 200 and len(json.loads(answer)["names"]) == count
            except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
                ok, answer = False, repr(err).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append(time.perf_counter() - t)
            if not ok:
                with lock:
                    failures.append(answer[:200])
        with lock:
            latencies.extend(mine)
            firsts.extend(first)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    cpu, wall = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    latencies.sort()
    firsts.sort()
    pick = lambda q, values=latencies: values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")
    return {"requests": requests, "failed": len(failures), "wall": wall, "rps": requests / wall,
            "names_per_s": (requests - len(failures)) * count / wall, "p50": pick(0.5), "p99": pick(0.99),
            "first_p50": pick(0.5, firsts),
            "client_cpu": (time.process_time() - cpu) / wall, "failures": failures[:3]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="the names-batched checkpoint (a file, or best / last)")
    parser.add_argument("--root_dir", default=".", help="where best / last are looked for")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[500, 2000, 5000],
                        help="requests at each client count, in the order of --clients")
    parser.add_argument("--count", type=int, default=10, help="names per request")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 1], help="--max_batch_size settings")
    parser.add_argument("--batch_timeout", type=float, default=0.005)
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="--workers_per_device settings")
    parser.add_argument("--modes", nargs="+", choices=["json", "stream"], default=["json"],
                        help="json: whole answers; stream: \"stream\": true, read line by line")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    if len(args.requests) != len(args.clients):
        parser.error("--requests needs one number per --clients")
    print(f"checkpoint {args.ckpt_path}; {args.count}-name requests; {os.cpu_count()} CPUs; "
          f"load average before {os.getloadavg()[0]:.1f}")
    rows, figures = [], {}
    settings = [(batch, workers) for batch in args.batch_sizes for workers in args.workers]
    for batch, workers in settings:
        proc, startup = start_server(args.ckpt_path, args.root_dir, args.port, batch, args.batch_timeout, workers)
        try:
            run_clients(args.port, 4, 100, args.count, seed=99)  # warm-up
            rss_before = server_rss(proc.pid)
            for mode in args.modes:
                for clients, requests in zip(args.clients, args.requests):
                    cpu = server_cpu(proc.pid)
                    result = run_clients(args.port, clients, requests, args.count, seed=clients,
                                         stream=mode == "stream")
                    result["server_cpu"] = (server_cpu(proc.pid) - cpu) / result["wall"]
                    figures[batch, workers, mode, clients] = result
                    rows.append((batch, workers, mode, clients, result))
                    for failure in result["failures"]:
                        print(f"  failure (batch {batch}, {workers} workers, {mode}, {clients} clients): {failure!r}")
            rss_after = server_rss(proc.pid)
            figures[batch, workers, "memory"] = (rss_before, rss_after, startup)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        time.sleep(1)

    print()
    print("| max_batch_size | workers | mode | clients | requests | failed | requests/s | names/s | p50 ms | p99 ms "
          "| first name p50 ms | client CPU | server CPU |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, workers, mode, clients, r in rows:
        print(f"| {batch} | {workers} | {mode} | {clients} | {r['requests']} | {r['failed']} | {r['rps']:.0f} | "
              f"{r['names_per_s']:.0f} | {r['p50'] * 1e3:.1f} | {r['p99'] * 1e3:.1f} | {r['first_p50'] * 1e3:.1f} | "
              f"{r['client_cpu']:.0%} | {r['server_cpu']:.0%} |")
    print()
    for batch, workers in settings:
        before, after, startup = figures[batch, workers, "memory"]
        print(f"max_batch_size {batch}, {workers} worker(s): ready {startup:.2f} s after the command; resident memory "
              f"(all server processes) {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after "
              f"({(after - before) / before:+.1%})")
    most, eight = max(args.clients), 8
    batched, single, one, mode = max(args.batch_sizes), min(args.batch_sizes), min(args.workers), args.modes[0]
    goals = []
    if (batched, one, mode, most) in figures and (single, one, mode, most) in figures:
        b, s1 = figures[batched, one, mode, most], figures[single, one, mode, most]
        speedup = b["rps"] / s1["rps"]
        before, after, _ = figures[batched, one, "memory"]
        goals += [
            (f"no failed request at {most} clients", b["failed"] == 0 and s1["failed"] == 0,
             f"{b['failed']} + {s1['failed']} of {b['requests']}"),
            (f"batching >= 3x the requests/s of none at {most} clients", speedup >= 3, f"{speedup:.1f}x"),
            ("resident memory grows < 10%", (after - before) / before < 0.10, f"{(after - before) / before:+.1%}"),
        ]
        if (batched, one, mode, eight) in figures:
            p99 = figures[batched, one, mode, eight]["p99"] * 1e3
            goals.append((f"p99 < 100 ms at {eight} clients (batching)", p99 < 100, f"{p99:.1f} ms"))
    more = max(args.workers)
    if more > one and (batched, more, mode, most) in figures and (batched, one, mode, most) in figures:
        ratio = figures[batched, more, mode, most]["rps"] / figures[batched, one, mode, most]["rps"]
        goals.append((f"{more} workers serve more requests/s than {one} at {most} clients", ratio > 1, f"{ratio:.2f}x"))
    if "stream" in args.modes:
        failed = sum(r["failed"] for _, _, m, _, r in rows if m == "stream")
        goals.append(("no failed streamed request", failed == 0, f"{failed} failed"))
    if goals:
        print()
    for goal, met, figure in goals:
        print(f"goal: {goal}: {'met' if met else 'NOT met'} ({figure})")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
