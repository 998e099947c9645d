"""Thin load generator: requests/s and latency of ``medfedpure serve`` at several client counts (loopback only).

``python benchmarks/serve_load.py --out benchmarks/results/serve/load.json`` starts ``medfedpure serve`` on
the embedded default bundle at a free loopback port (or uses ``--url``, which must be a loopback
address), waits for ``/healthz``, then for each client count C (``--clients 1,4,16``) sends
``--requests`` ``POST /v1/classify`` calls from C threads (one keep-alive httpx client each), the
scans being synthetic PNGs of the bundle's own simulated scanner (``medfedpure.demo.synthetic_scans``)
and request i keyed by seed i. Each level is bounded by ``--max-seconds``. It records requests/s
(completed ÷ wall time), client-side p50/p99 latency, the server's own ``latency_ms.total`` p50, and
the answers' statuses, and writes JSON after every level.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from medfedpure.demo import synthetic_scans
from medfedpure.runtime.bundle import default_bundle_path, verify_bundle
from medfedpure.serve.config import is_loopback
from PIL import Image


def png_scans(n: int, seed: int) -> list[bytes]:
    """``n`` synthetic scans of the default bundle's site as PNG bytes (its own scanner, unseen indices)."""
    vb = verify_bundle(default_bundle_path())
    prov = vb.manifest["provenance"]
    dataset = {**prov["dataset"], "site": int(prov.get("site", 0))}
    imgs, _ = synthetic_scans(n, vb.image_size, seed=seed, site=dataset["site"], dataset=dataset)
    out = []
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def level(url: str, scans: list[bytes], clients: int, requests: int, max_seconds: float) -> dict:
    """One client count: ``requests`` calls from ``clients`` threads, stopping early at ``max_seconds``."""
    lock = threading.Lock()
    nxt = iter(range(requests))
    lat_ms: list[float] = []
    server_ms: list[float] = []
    statuses: dict[str, int] = {}
    t0 = time.perf_counter()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() - t0 < max_seconds:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                ts = time.perf_counter()
                r = c.post("/v1/classify", params={"seed": i}, content=scans[i % len(scans)],
                           headers={"Content-Type": "image/png"})
                dt = (time.perf_counter() - ts) * 1e3
                key = r.json()["status"] if r.status_code == 200 else f"http {r.status_code}"
                with lock:
                    lat_ms.append(dt)
                    statuses[key] = statuses.get(key, 0) + 1
                    if r.status_code == 200:
                        server_ms.append(r.json()["latency_ms"]["total"])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat_ms)
    return {"clients": clients, "requests": len(lat_ms), "wall_s": wall, "requests_per_s": len(lat_ms) / wall,
            "latency_ms": {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
                           "mean": float(a.mean()), "max": float(a.max())},
            "server_total_ms_p50": float(np.median(server_ms)) if server_ms else None, "statuses": statuses,
            "load_avg_end": os.getloadavg()}


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medfedpure", "serve", "--port", str(port), "--log-level", "warning", *extra]
    return subprocess.Popen(cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--url", default=None, help="an already running service (loopback only); default: start one")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=200, help="requests per client count (≤ 10000)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time bound per client count")
    ap.add_argument("--scans", type=int, default=32, help="distinct synthetic scans, cycled")
    ap.add_argument("--scan-seed", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--serve-args", default="", help="extra `medfedpure serve` arguments, space-separated")
    a = ap.parse_args()
    if not 1 <= a.requests <= 10_000 or not 0 < a.max_seconds <= 600:
        raise SystemExit("--requests must be in [1, 10000] and --max-seconds in (0, 600]")
    proc = None
    if a.url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        proc = start_server(port, a.serve_args.split())
    else:
        url = a.url.rstrip("/")
        if not is_loopback(urlparse(url).hostname or ""):
            raise SystemExit(f"--url {url}: only loopback addresses are measured")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise SystemExit("the service did not become ready")
            time.sleep(0.3)
        scans = png_scans(a.scans, a.scan_seed)
        info = httpx.get(f"{url}/v1/bundle").json()
        level(url, scans, 1, a.warmup, a.max_seconds)  # warm-up, not recorded
        record: dict = {"url": url, "bundle_id": info["bundle_id"], "engine": info["engine"], "policy": info["policy"],
                        "serve_args": a.serve_args, "scan_bytes_mean": float(np.mean([len(s) for s in scans])),
                        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "processor": platform.processor(),
                                    "load_avg_start": os.getloadavg()}, "levels": []}
        for c in (int(x) for x in a.clients.split(",")):
            row = level(url, scans, c, a.requests, a.max_seconds)
            record["levels"].append(row)
            print(f"{c:>3} clients: {row['requests']} requests in {row['wall_s']:.1f} s → {row['requests_per_s']:.1f} "
                  f"req/s, p50 {row['latency_ms']['p50']:.1f} ms, p99 {row['latency_ms']['p99']:.1f} ms, server p50 "
                  f"{row['server_total_ms_p50']:.1f} ms, {row['statuses']}", flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(record, indent=1) + "\n")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
