"""Load on ``microgpt serve``: C concurrent clients sending 10-name requests, with batching and without.

    python benchmarks/serve_load.py --ckpt_path best --root_dir runs/names-batched

For each server setting (``--max_batch_size 64`` and ``1``) it starts the real server, times the command to the
first ``GET /health`` that answers 200, warms it up, and then for C = 1, 8, 32 client threads (each with its own
keep-alive connection) sends the requests and reports requests/s, names/s, p50/p99 latency, the failures, and
the CPU the clients and the server used (client and server share the machine). The server's resident memory
(all its processes) is read before the first level and after the last. It ends with the goals, each met or not.
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


def start_server(ckpt: str, root_dir: str, port: int, max_batch_size: int, batch_timeout: float) -> tuple:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MICROGPT_API_KEY", None)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "microgpt", "serve", "--ckpt_path", ckpt, "--root_dir", root_dir,
                             "--port", str(port), "--max_batch_size", str(max_batch_size),
                             "--batch_timeout", str(batch_timeout)],
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


def run_clients(port: int, clients: int, requests: int, count: int, seed: int) -> dict:
    """``requests`` POST /predict spread over ``clients`` threads; latencies in seconds and failures."""
    latencies, failures, lock = [], [], threading.Lock()
    share = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for _ in range(share[i]):
            body = json.dumps({"count": count, "prefix": rng.choice(PREFIXES), "temperature": 0.8})
            t = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = response.read()
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

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    cpu, wall = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {"requests": requests, "failed": len(failures), "wall": wall, "rps": requests / wall,
            "names_per_s": (requests - len(failures)) * count / wall, "p50": pick(0.5), "p99": pick(0.99),
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
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    if len(args.requests) != len(args.clients):
        parser.error("--requests needs one number per --clients")
    print(f"checkpoint {args.ckpt_path}; {args.count}-name requests; {os.cpu_count()} CPUs; "
          f"load average before {os.getloadavg()[0]:.1f}")
    rows, figures = [], {}
    for batch in args.batch_sizes:
        proc, startup = start_server(args.ckpt_path, args.root_dir, args.port, batch, args.batch_timeout)
        try:
            run_clients(args.port, 4, 100, args.count, seed=99)  # warm-up
            rss_before = server_rss(proc.pid)
            for clients, requests in zip(args.clients, args.requests):
                cpu = server_cpu(proc.pid)
                result = run_clients(args.port, clients, requests, args.count, seed=clients)
                result["server_cpu"] = (server_cpu(proc.pid) - cpu) / result["wall"]
                figures[batch, clients] = result
                rows.append((batch, clients, result))
                for failure in result["failures"]:
                    print(f"  failure (batch {batch}, {clients} clients): {failure!r}")
            rss_after = server_rss(proc.pid)
            figures[batch, "memory"] = (rss_before, rss_after, startup)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        time.sleep(1)

    print()
    print("| max_batch_size | clients | requests | failed | requests/s | names/s | p50 ms | p99 ms | client CPU | server CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, clients, r in rows:
        print(f"| {batch} | {clients} | {r['requests']} | {r['failed']} | {r['rps']:.0f} | {r['names_per_s']:.0f} | "
              f"{r['p50'] * 1e3:.1f} | {r['p99'] * 1e3:.1f} | {r['client_cpu']:.0%} | {r['server_cpu']:.0%} |")
    print()
    for batch in args.batch_sizes:
        before, after, startup = figures[batch, "memory"]
        print(f"max_batch_size {batch}: ready {startup:.2f} s after the command; resident memory (all server "
              f"processes) {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after "
              f"({(after - before) / before:+.1%})")
    most, eight = max(args.clients), 8
    batched, single = max(args.batch_sizes), min(args.batch_sizes)
    if (batched, most) in figures and (single, most) in figures:
        speedup = figures[batched, most]["rps"] / figures[single, most]["rps"]
        before, after, _ = figures[batched, "memory"]
        goals = [
            (f"no failed request at {most} clients", figures[batched, most]["failed"] == 0
             and figures[single, most]["failed"] == 0, (f"{figures[batched, most]['failed']} + "
                                                        f"{figures[single, most]['failed']} of "
                                                        f"{figures[batched, most]['requests']}")),
            (f"batching >= 3x the requests/s of none at {most} clients", speedup >= 3, f"{speedup:.1f}x"),
            ("resident memory grows < 10%", (after - before) / before < 0.10, f"{(after - before) / before:+.1%}"),
        ]
        if (batched, eight) in figures:
            p99 = figures[batched, eight]["p99"] * 1e3
            goals.append((f"p99 < 100 ms at {eight} clients (batching)", p99 < 100, f"{p99:.1f} ms"))
        print()
        for goal, met, figure in goals:
            print(f"goal: {goal}: {'met' if met else 'NOT met'} ({figure})")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
