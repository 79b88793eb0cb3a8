"""Reward server throughput and latency on loopback, against scoring in-process.

    python benchmarks/server.py [--quick] [--endpoint score|classify] [--users U] [--json out]

Starts ``sharelora serve`` (MiniLM, ``sharelora``, the demo's 10 users or ``--users`` U) in a
subprocess on 127.0.0.1, then sends ``/score`` requests (or vLLM's ``/classify``, as verl's
reward loop calls it: one user per request in ``model``) from 1, 8 and 32 concurrent clients
(each request holds ``--rows`` rows; every loop is bounded by a request count and a time
limit). The baseline is ``score_texts`` called in one process on the same rows with the
server's batch size. Prints rows/s, requests/s, p50 and p99 latency, and throughput as a
fraction of in-process.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from common import machine, parser, table, write_json

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.data import read_preferences
from sharelora.score import score_texts

BATCH = 64
COLUMNS = (
    "concurrency",
    "requests",
    "requests_per_s",
    "rows_per_s",
    "p50_ms",
    "p99_ms",
    "vs_in_process",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not come up in {seconds:.0f} s")


def request_body(endpoint: str, part: list[tuple]) -> dict:
    """One request's JSON: ``/score`` takes a user per row, ``/classify`` one user (the
    ``model``) for all its ``input`` texts, rendered as the server renders a prompt + reply."""
    if endpoint == "score":
        return {
            "prompts": [r[0] for r in part],
            "responses": [r[1] for r in part],
            "users": [r[2] for r in part],
        }
    return {"model": part[0][2], "input": [r[0] + "\n" + r[1] for r in part], "activation": False}


def run_level(url, sample, rows, concurrency, requests, limit, endpoint="score") -> list[float]:
    """``requests`` requests of ``rows`` rows from ``concurrency`` clients (stopping after
    ``limit`` seconds); returns each request's latency in seconds."""
    latencies: list[float] = []
    deadline = time.time() + limit

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            for i in range(k, requests, concurrency):
                if time.time() > deadline:
                    return
                body = request_body(endpoint, sample[i * rows : (i + 1) * rows])
                t = time.perf_counter()
                c.post(f"{url}/{endpoint}", json=body).raise_for_status()
                latencies.append(time.perf_counter() - t)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return latencies


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=4, help="rows per request")
    p.add_argument("--endpoint", choices=("score", "classify"), default="score")
    p.add_argument(
        "--users",
        type=int,
        default=0,
        help="deal the rows round-robin over this many users, so the server's batches mix "
        "them (0: the demo's own 10 users)",
    )
    args = p.parse_args()
    requests_per_level = 48 if args.quick else 192
    data, _ = read_preferences("builtin:demo")
    rows = [(c.prompt, c.chosen, c.user) for c in data]
    if args.users:
        rows = [(q, a, f"user{i % args.users}") for i, (q, a, _) in enumerate(rows)]
    if args.endpoint == "classify":  # one user per request: the rows in runs of one user
        rows = sorted(rows, key=lambda r: r[2])
    torch.manual_seed(0)
    users = sorted({u for _, _, u in rows})
    model = PersonalizedRewardModel.from_backbone(
        "minilm", users, AdapterConfig(top_layers=1), max_length=128
    )
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    model.eval()

    # In-process: the same rows, one call per BATCH rows.
    n = requests_per_level * args.rows
    sample = (rows * (n // len(rows) + 1))[:n]
    prompts, responses, names = map(list, zip(*sample, strict=True))
    score_texts(model, prompts[:BATCH], responses[:BATCH], names[:BATCH], BATCH)  # warm-up
    start = time.perf_counter()
    score_texts(model, prompts, responses, names, BATCH)
    in_process = n / (time.perf_counter() - start)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sharelora.cli", "serve", "--model", folder, "--port", str(port)]
    server = subprocess.Popen(cmd + ["--batch-size", str(BATCH)], stderr=subprocess.DEVNULL)
    results = []
    try:
        wait_until_up(url)
        limit = 60 if args.quick else 180  # seconds per concurrency level, at most
        for concurrency in (1, 8, 32):
            start = time.perf_counter()
            lat = sorted(
                run_level(
                    url, sample, args.rows, concurrency, requests_per_level, limit, args.endpoint
                )
            )
            seconds = time.perf_counter() - start
            rows_per_s = len(lat) * args.rows / seconds
            results.append(
                {
                    "concurrency": concurrency,
                    "requests": len(lat),
                    "requests_per_s": len(lat) / seconds,
                    "rows_per_s": rows_per_s,
                    "p50_ms": 1000 * statistics.median(lat),
                    "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                    "vs_in_process": rows_per_s / in_process,
                }
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"{machine()}; /{args.endpoint}, {len(users)} users, {args.rows} rows per request, "
        f"server batch {BATCH}"
    )
    print(f"in-process score_texts: {in_process:.1f} rows/s")
    print(
        table(
            ["clients", "requests", "req/s", "rows/s", "p50 ms", "p99 ms", "vs in-process"],
            [[r[k] for k in COLUMNS] for r in results],
        )
    )
    payload = {
        "machine": machine(),
        "endpoint": args.endpoint,
        "users": len(users),
        "in_process_rows_per_s": in_process,
        "levels": results,
    }
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
