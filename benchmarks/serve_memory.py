"""Memory of `retinanet serve` under hostile uploads: small files that decode to huge images.

Starts the real command on 127.0.0.1 with a small model it builds, then sends
  1. `--requests` uploads in a row of a 1-bit PNG of `--side` x `--side` pixels (about 20 KB),
  2. `--concurrent` of them at once,
  3. `--concurrent` uploads at once of a PNG of `--accepted-side` pixels a side (an image the
     server accepts, the most an upload can cost after the pixel budget),
while it samples the server's resident memory (/proc/PID/status) and asks /health four times a
second. Prints one JSON line per phase and a summary; exits 1 if /health ever failed to answer
or the server's memory passed `--ceiling-gb`.

    python benchmarks/serve_memory.py                       # the defaults: 20 in a row, 8 at once
    python benchmarks/serve_memory.py --requests 3 --concurrent 2 --abort-gb 12

The server is killed when its memory passes `--abort-gb`, so that a server without a pixel
budget cannot take the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

HOST = "127.0.0.1"


def build_model(folder: Path) -> Path:
    from retinanet import RetinaNet, save_model
    from retinanet.config import apply_overrides, load_config

    cfg = apply_overrides(load_config("demo"), ["model.input.test_min_size=128", "model.input.max_size=128",
                                                "model.fpn.out_channels=32", "model.head.num_convs=1"]).model
    return save_model(RetinaNet.from_config(cfg), folder / "small.pt")


def hostile_png(path: Path, side: int) -> Path:
    """A 1-bit PNG: `side`^2 pixels in a few KB, RGB `3 * side^2` bytes once decoded."""
    Image.MAX_IMAGE_PIXELS = None  # writing it, not reading it
    Image.new("1", (side, side)).save(path, optimize=True)
    return path


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Watch:
    """Samples the server's RSS every 50 ms and its /health every 250 ms in two threads."""

    def __init__(self, proc: subprocess.Popen, url: str, abort_kb: int):
        self.proc, self.url, self.abort_kb = proc, url, abort_kb
        self.peak_kb, self.health_failures, self.health_worst_s, self.aborted = 0, 0, 0.0, False
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss, daemon=True),
                         threading.Thread(target=self._health, daemon=True)]

    def start(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def reset(self) -> None:
        self.peak_kb, self.health_failures, self.health_worst_s = 0, 0, 0.0

    def _rss(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                rss = status_kb(self.proc.pid, "VmRSS")
            except (FileNotFoundError, ProcessLookupError):
                return
            self.peak_kb = max(self.peak_kb, rss)
            if rss > self.abort_kb:
                self.aborted = True
                self.proc.kill()
                return
            time.sleep(0.05)

    def _health(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            start = time.perf_counter()
            try:
                ok = httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            elapsed = time.perf_counter() - start
            self.health_worst_s = max(self.health_worst_s, elapsed)
            self.health_failures += not ok
            time.sleep(max(0.0, 0.25 - elapsed))


def start_server(weights: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "retinanet.cli", "serve", "--weights", str(weights), "--host", HOST,
               "--port", str(port), "--device", "cpu", *extra]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://{HOST}:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            raise SystemExit("the server did not start: " + proc.stderr.read()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not answer /health within 2 minutes")


def send(url: str, data: bytes, timeout: float) -> tuple[int, float, str]:
    start = time.perf_counter()
    try:
        response = httpx.post(url + "/predict", files={"file": ("hostile.png", data, "image/png")}, timeout=timeout)
        code, text = response.status_code, response.text[:200]
    except httpx.HTTPError as err:
        code, text = 0, f"{type(err).__name__}: {err}"
    return code, time.perf_counter() - start, text


def phase(name: str, proc, url: str, watch: Watch, data: bytes, count: int, parallel: int, timeout: float) -> dict:
    watch.reset()
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda _: send(url, data, timeout), range(count)))
    wall = time.perf_counter() - start
    time.sleep(2.0)  # let the server finish and free what it holds
    alive = proc.poll() is None
    row = {"phase": name, "requests": count, "at_once": parallel, "upload_bytes": len(data),
           "codes": sorted({code for code, _, _ in results}), "slowest_s": round(max(t for _, t, _ in results), 2),
           "wall_s": round(wall, 2), "peak_rss_mb": watch.peak_kb // 1024,
           "after_rss_mb": status_kb(proc.pid, "VmRSS") // 1024 if alive else None,
           "health_failures": watch.health_failures, "health_worst_s": round(watch.health_worst_s, 2),
           "server_alive": alive, "killed_at_abort_limit": watch.aborted, "first_answer": results[0][2]}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=13000, help="hostile image side (13000: 169 MP)")
    parser.add_argument("--accepted-side", type=int, default=6000, help="side of an accepted large image (36 MP)")
    parser.add_argument("--requests", type=int, default=20, help="hostile uploads sent one after another")
    parser.add_argument("--concurrent", type=int, default=8, help="uploads sent at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--ceiling-gb", type=float, default=3.0, help="memory the server must stay under")
    parser.add_argument("--abort-gb", type=float, default=12.0, help="kill the server above this")
    parser.add_argument("--serve-args", default="", help="more `retinanet serve` options, e.g. '--max-pixels N'")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = build_model(folder)
        hostile = hostile_png(folder / "hostile.png", args.side).read_bytes()
        accepted = hostile_png(folder / "accepted.png", args.accepted_side).read_bytes()
        proc, url = start_server(weights, args.serve_args.split())
        watch = Watch(proc, url, int(args.abort_gb * 1024 * 1024)).start()
        try:
            idle_mb = status_kb(proc.pid, "VmRSS") // 1024
            print(json.dumps({"server_idle_rss_mb": idle_mb, "cpus": os.cpu_count()}), flush=True)
            rows = []
            for name, data, count, parallel in (("hostile in a row", hostile, args.requests, 1),
                                                ("hostile at once", hostile, args.concurrent, args.concurrent),
                                                ("accepted at once", accepted, args.concurrent, args.concurrent)):
                if proc.poll() is not None:
                    break
                rows.append(phase(name, proc, url, watch, data, count, parallel, args.timeout))
        finally:
            watch.stop()
            hwm = status_kb(proc.pid, "VmHWM") // 1024 if proc.poll() is None else None
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ceiling_mb = args.ceiling_gb * 1024
    bad = [r["phase"] for r in rows if r["health_failures"] or not r["server_alive"] or r["peak_rss_mb"] > ceiling_mb]
    print(json.dumps({"server_high_water_mb": hwm, "ceiling_mb": ceiling_mb, "failed_phases": bad}), flush=True)
    return 1 if bad or len(rows) < 3 else 0


if __name__ == "__main__":
    sys.exit(main())
