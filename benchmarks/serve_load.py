"""Load on `xferlearn serve`: requests/s and latency for real X-ray uploads over 127.0.0.1.

    python benchmarks/serve_load.py [--run RUN] [--engines torch,onnx,onnx-int8] [--requests 500]
                                    [--concurrency 16] [--explain]

Without --run it first trains efficientnet_lite0 (packaged weights, offline) on a small
slice of ../shared/data/chest_xray_224/train. The server runs as its own process
(`python -m xferlearn.cli serve RUN`), as a user would start it, on a free port of
127.0.0.1. The load comes from httpx's async client with at most --concurrency requests
in flight; it sends the bounded number of requests (original-size X-rays from
../shared/data/samples_original unless --images says otherwise), prints its figures with
the machine and the command that made them, stops the server and exits (1 if any failed).

With several --engines, one server per engine (`serve RUN --engine E`) takes the same load in
turn, and a table gives requests/s, p50/p99 latency and errors side by side. The ONNX exports
(and the int8 quantisation, with its validation check) are made before, timed apart; an
engine whose export is refused (int8 moving validation AUC too far) is named, not measured.
The targets of issue 13 (at 16 clients: >= 100 requests/s, p99 <= 300 ms, 0 errors) are
checked per engine.

    python benchmarks/serve_load.py --soak --engines default --requests 2000 [--rss-ceiling-mb 2048] [--arena-max N]

Each server's resident memory is watched while its load runs (sampled every 0.5 s, and its
peak from /proc/PID/status VmHWM). --soak exits 1 when a peak passes --rss-ceiling-mb
(default 2048) or any request failed. `xferlearn serve` caps glibc's malloc arenas at two;
--arena-max N sets MALLOC_ARENA_MAX=N for the server instead (e.g. 16, glibc's own default
on 2 cores), to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from machine import cpu_model  # benchmarks/machine.py: scripts here import their neighbours

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_small_run(workdir: Path, per_class: int) -> Path:
    """efficientnet_lite0 on the first `per_class` images of each class of the shared train split."""
    from xferlearn import train

    source = SHARED / "chest_xray_224" / "train"
    if not source.is_dir():
        sys.exit(f"no --run given and the shared data is absent ({source}): pass --run RUN_DIR")
    for cls in ("NORMAL", "PNEUMONIA"):
        (workdir / "data" / cls).mkdir(parents=True)
        for path in sorted((source / cls).glob("*.jpeg"))[:per_class]:
            shutil.copy(path, workdir / "data" / cls / path.name)
    started = time.perf_counter()
    result = train(data=str(workdir / "data"), out=str(workdir / "run"), backbone="efficientnet_lite0",
                   epochs=10, views=0, cache_dir=str(workdir / "cache"))
    print(f"trained efficientnet_lite0 on {2 * per_class} images in {time.perf_counter() - started:.0f} s "
          f"(validation AUC {result.metrics.get('auc')})", file=sys.stderr)
    return result.run_dir


def start_server(run: Path, port: int, log_path: Path, engine: str | None = None,
                 arena_max: int | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    env = {**os.environ, **({"MALLOC_ARENA_MAX": str(arena_max)} if arena_max else {})}
    server = subprocess.Popen([sys.executable, "-m", "xferlearn.cli", "serve", str(run), "--host", "127.0.0.1",
                               "--port", str(port), *(["--engine", engine] if engine else [])],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    with httpx.Client(trust_env=False, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    server.terminate()
    sys.exit(f"the server did not answer /health within 180 s:\n{log_path.read_text()[-2000:]}")


async def send_load(url: str, images: list[tuple[str, bytes]], requests: int, concurrency: int,
                    explain: bool) -> tuple[list[float], list[str], float]:
    """Send `requests` uploads, at most `concurrency` at once; (latencies of successes, errors, wall seconds)."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    params = {"explain": "true"} if explain else {}

    async def worker(client: httpx.AsyncClient):
        nonlocal next_index
        while next_index < requests:
            name, data = images[next_index % len(images)]
            next_index += 1
            started = time.perf_counter()
            try:
                response = await client.post("/predict", params=params, files={"file": (name, data, "image/jpeg")})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors.append(f"{response.status_code} {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(f"{type(error).__name__}: {error}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300, trust_env=False) as client:
        for name, data in images[:2]:  # warm-up, not counted: first calls allocate and load lazily
            await client.post("/predict", params=params, files={"file": (name, data, "image/jpeg")})
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - started


def resident_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS) or its peak so far (VmHWM), in MB; 0 where /proc has none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemoryWatch:
    """Samples a process's resident memory every `every` seconds in a thread while the load runs."""

    def __init__(self, pid: int, every: float = 0.5):
        import threading

        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(resident_mb(self.pid))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def prepare(run: Path, engine: str) -> str | None:
    """Export (and quantise) for an ONNX engine before its server starts; the reason where refused."""
    if engine not in ("onnx", "onnx-int8"):
        return None
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "xferlearn.cli", "export", str(run), "--format", engine],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    print(f"  export {engine}: {time.perf_counter() - started:.1f} s (not part of the figures)", file=sys.stderr)
    return None


def load_engine_server(run: Path, engine: str, images, args, tmp: Path) -> dict:
    port = free_port()
    server = start_server(run, port, tmp / f"server-{engine}.log", engine, args.arena_max)
    try:
        card = httpx.get(f"http://127.0.0.1:{port}/model", trust_env=False).json()
        at_rest = resident_mb(server.pid)
        with MemoryWatch(server.pid):
            latencies, errors, wall = asyncio.run(send_load(f"http://127.0.0.1:{port}", images, args.requests,
                                                            args.concurrency, args.explain))
        peak, after = resident_mb(server.pid, "VmHWM"), resident_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    result = {"engine": card.get("engine", engine), "card": card, "answered": len(latencies), "errors": errors,
              "wall": wall, "rps": len(latencies) / wall, "rest_mb": at_rest, "after_mb": after, "peak_mb": peak}
    if latencies:
        result["p50"], result["p99"] = (float(v) for v in np.percentile(np.array(latencies) * 1000, [50, 99]))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run folder; without it, efficientnet_lite0 is trained first")
    parser.add_argument("--engines", default="torch,onnx,onnx-int8",
                        help="comma-separated serve engines to load in turn (default: torch,onnx,onnx-int8; "
                             "'default' serves without --engine)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--images", type=Path, default=SHARED / "samples_original",
                        help="a folder of images to upload (default: the shared original-size X-rays)")
    parser.add_argument("--explain", action="store_true", help="ask for Grad-CAM heatmaps too")
    parser.add_argument("--train-per-class", type=int, default=40, help="images per class for the quick run")
    parser.add_argument("--soak", action="store_true",
                        help="exit 1 when a server's peak resident memory passes --rss-ceiling-mb")
    parser.add_argument("--rss-ceiling-mb", type=float, default=2048, help="(--soak) the most the peak may be")
    parser.add_argument("--arena-max", type=int, help="set MALLOC_ARENA_MAX for the server (default: xferlearn's 2)")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if args.images.is_dir() else []
    if not paths:
        sys.exit(f"no images under {args.images}: pass --images DIR")
    images = [(p.name, p.read_bytes()) for p in paths]

    results, refused = [], {}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        run = args.run or train_small_run(Path(tmp), args.train_per_class)
        for engine in engines:
            reason = prepare(run, engine)
            if reason:
                refused[engine] = reason
                continue
            results.append(load_engine_server(run, None if engine == "default" else engine, images, args, Path(tmp)))

    sizes = [len(data) for _, data in images]
    card = results[0]["card"] if results else {}
    print(f"\nxferlearn serve under load: {args.requests} requests per engine, {args.concurrency} in flight"
          f"{', with Grad-CAM' if args.explain else ''}")
    print(f"  model            {card.get('model_id')} at {card.get('input_size')} px"
          f" ({run if args.run else 'trained for this benchmark'})")
    print(f"  images           {len(images)} files from {args.images}, {min(sizes) // 1024}-{max(sizes) // 1024} KB")
    arenas = f"MALLOC_ARENA_MAX={args.arena_max}" if args.arena_max else "xferlearn's default, 2 malloc arenas"
    print(f"\n| engine | requests/s | p50 ms | p99 ms | errors | memory MB: rest / after / peak ({arenas}) "
          "| target: >= 100 req/s, p99 <= 300 ms, 0 errors |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        met = r["rps"] >= 100 and r.get("p99", float("inf")) <= 300 and not r["errors"]
        print(f"| {r['engine']} | {r['rps']:.1f} | {r.get('p50', float('nan')):.0f} | {r.get('p99', float('nan')):.0f}"
              f" | {len(r['errors'])} | {r['rest_mb']:.0f} / {r['after_mb']:.0f} / {r['peak_mb']:.0f} "
              f"| {'met' if met else 'NOT met'} |")
    over = [r["engine"] for r in results if args.soak and r["peak_mb"] >= args.rss_ceiling_mb]
    if args.soak:
        print(f"  soak             peak memory {'OVER' if over else 'under'} the {args.rss_ceiling_mb:.0f} MB ceiling"
              + (f" ({', '.join(over)})" if over else ""))
    for r in results:
        if r["errors"]:
            print(f"  {r['engine']}: first error: {r['errors'][0]}")
    for engine, reason in refused.items():
        print(f"  {engine}: not measured, its export was refused: {reason}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"  machine          {usable} usable cores of {os.cpu_count()}, {cpu_model()}, "
          f"{platform.system()} {platform.release()}, Python {platform.python_version()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    print(f"  command          {shlex.join([Path(sys.executable).name, *sys.argv])}")
    return 1 if any(r["errors"] for r in results) or not results or over else 0


if __name__ == "__main__":
    sys.exit(main())
