"""Bounded load test of ``deeplabv2 serve`` on 127.0.0.1: nothing lost, memory bounded.

Starts ``deeplabv2 serve CHECKPOINT`` as a subprocess bound to 127.0.0.1 on a free port, then:

1. baseline: ``--baseline`` requests one after another from a single client;
2. load: ``--requests`` requests from ``--clients`` concurrent clients, each a 512x1024 PNG
   (synthetic street scenes), no retries;
3. the same with clients that honour ``503`` + ``Retry-After`` until they have their result.

In 2 every request must be answered with a result (200) or a refusal of the full queue (503); a
connection error, a timeout or any other status counts as lost. In 3 every request must end
with a result. The server's resident memory
(VmRSS from /proc) is sampled every 50 ms; the server must still answer /api/health at the end.
Writes a Markdown report with the counts, latencies, throughput against the single-client
baseline measured in the same run, memory, the command, the CPU and the date. Only 127.0.0.1
is ever contacted, and the run is bounded by ``--deadline`` seconds.

    python benchmarks/serve_load.py runs/demo/model.pth        # writes serve_load_results.md
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from deeplabv2.data import SyntheticDataset

HOST = "127.0.0.1"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            timeout: float = 120) -> tuple[int, float]:
    """``(status, seconds)``; status 0 = lost (connection error or timeout)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "image/png"} if body
                     else {})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    except (OSError, http.client.HTTPException):
        return 0, time.perf_counter() - started
    finally:
        conn.close()


def pngs(count: int, height: int, width: int) -> list[bytes]:
    ds = SyntheticDataset("val", size=(height, width), num_samples=count)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(ds.load(i)[0]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--baseline", type=int, default=10, help="sequential requests first")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--queue", type=int, default=4, help="the server's --queue")
    p.add_argument("--deadline", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--out", default=str(Path(__file__).with_name("serve_load_results.md")))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.requests > 2000 or args.clients > 64:
        p.error("bounded test: at most 2000 requests and 64 clients")

    load_average = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    port = free_port()
    cmd = [sys.executable, "-m", "deeplabv2", "serve", args.checkpoint, "--host", HOST,
           "--port", str(port), "--queue", str(args.queue), "--device", "cpu"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
    started = time.monotonic()
    try:
        while request(port, "GET", "/api/health", timeout=2)[0] != 200:
            if server.poll() is not None or time.monotonic() - started > 120:
                raise SystemExit("server did not start:\n" + "".join(log))
            time.sleep(0.2)
        bodies = pngs(8, args.height, args.width)
        rss = {"after_start": rss_mb(server.pid)}
        samples: list[float] = []
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                samples.append(rss_mb(server.pid))
                time.sleep(0.05)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        # 1. one client, one request at a time
        base = [request(port, "POST", "/api/predict", bodies[i % len(bodies)])
                for i in range(args.baseline)]
        base_ok = [s for code, s in base if code == 200]
        rss["after_baseline"] = rss_mb(server.pid)

        # 2. N clients at once, no retries: every answer is a result or a 503
        deadline = started + args.deadline

        def one(i):
            if time.monotonic() > deadline:
                return -1, 0.0  # not sent: the run's time is up
            return request(port, "POST", "/api/predict", bodies[i % len(bodies)])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        rss["after_load"] = rss_mb(server.pid)

        # 3. the same, each client honouring 503 + Retry-After (1 s) until it gets its result
        def patient(i):
            tries = 0
            while time.monotonic() < deadline:
                code, _ = request(port, "POST", "/api/predict", bodies[i % len(bodies)])
                tries += 1
                if code != 503:
                    return code, tries
                time.sleep(1.0)
            return -1, tries
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            retried = list(pool.map(patient, range(args.requests)))
        retry_wall = time.perf_counter() - t0
        sampling.set()
        sampler.join()
        alive = server.poll() is None and request(port, "GET", "/api/health", timeout=5)[0] == 200
        rss["after_retry_load"] = rss_mb(server.pid) if server.poll() is None else float("nan")
        rss["peak"] = max(samples)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()

    codes: dict[int, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    ok = [s for code, s in results if code == 200]
    lost = sum(n for code, n in codes.items() if code not in (200, 503))
    retry_codes: dict[int, int] = {}
    for code, _ in retried:
        retry_codes[code] = retry_codes.get(code, 0) + 1
    base_rate = len(base_ok) / sum(base_ok) if base_ok else float("nan")
    rate = len(ok) / wall
    summary = {
        "load_average": load_average,
        "requests": args.requests, "clients": args.clients, "image": [args.height, args.width],
        "queue": args.queue, "status_counts": {str(k): v for k, v in sorted(codes.items())},
        "lost": lost, "server_alive_after": alive, "wall_seconds": round(wall, 2),
        "baseline_seconds_per_image": round(statistics.median(base_ok), 3) if base_ok else None,
        "ok_latency_p50": round(percentile(ok, 0.5), 3), "ok_latency_p95":
        round(percentile(ok, 0.95), 3), "ok_latency_max": round(max(ok, default=float("nan")), 3),
        "ok_per_second": round(rate, 3), "baseline_per_second": round(base_rate, 3),
        "retry_throughput_vs_single_client": round(
            retry_codes.get(200, 0) / retry_wall / base_rate, 2),
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "with_retries": {"status_counts": {str(k): v for k, v in sorted(retry_codes.items())},
                         "attempts": sum(t for _, t in retried),
                         "wall_seconds": round(retry_wall, 2),
                         "results_per_second": round(retry_codes.get(200, 0) / retry_wall, 3)},
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(Path(args.out), summary, args, cmd)
    return 0 if lost == 0 and alive and retry_codes.get(200) == args.requests else 1


def write_markdown(path: Path, s: dict, args, cmd) -> None:
    counts = ", ".join(f"{n} x {'lost' if code == '0' else code}"
                       for code, n in s["status_counts"].items())
    rss = s["rss_mb"]
    text = f"""# `deeplabv2 serve` under a bounded load

Command: `python benchmarks/serve_load.py {args.checkpoint} --requests {args.requests} --clients {args.clients} --queue {args.queue}`
(server: `deeplabv2 serve CHECKPOINT --host 127.0.0.1 --queue {args.queue}`, one worker thread,
the model's default threads). Machine: {cpu_model()}, load average {s['load_average']} at the start
(other work shares the machine). Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.
Each request: a {args.width}x{args.height} PNG synthetic street scene, `POST /api/predict` (label PNG answer).

| | value |
| --- | --- |
| requests / concurrent clients | {s['requests']} / {s['clients']} |
| answers | {counts} |
| lost (connection error, timeout, other status) | **{s['lost']}** |
| server answers /api/health afterwards | {s['server_alive_after']} |
| wall time of the load phase | {s['wall_seconds']} s |
| latency of the 200s: median / p95 / max | {s['ok_latency_p50']} / {s['ok_latency_p95']} / {s['ok_latency_max']} s |
| **with retries** (each client waits `Retry-After` on a 503 and sends again) | |
| answers in the end | {', '.join(f"{n} x {c}" for c, n in s['with_retries']['status_counts'].items())} |
| attempts for {s['requests']} results | {s['with_retries']['attempts']} |
| wall time / results per second | {s['with_retries']['wall_seconds']} s / {s['with_retries']['results_per_second']} |
| results per second, 1 client one request at a time, same run (baseline, {args.baseline} requests) | {s['baseline_per_second']} ({s['baseline_seconds_per_image']} s per image) |
| {s['clients']} retrying clients vs the baseline | {s['retry_throughput_vs_single_client']}x |
| server RSS: after start / after baseline / after load / after load with retries / peak (50 ms samples) | {rss['after_start']} / {rss['after_baseline']} / {rss['after_load']} / {rss['after_retry_load']} / {rss['peak']} MB |

With {s['clients']} clients and a queue of {args.queue}, requests beyond the queue are answered 503 at
once (clients are expected to retry after `Retry-After: 1`), so the server never holds more
than {args.queue} images in memory; the peak RSS is set by the queue, not by the number of clients.
"""
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
