"""Load test of the HTTP inspection service (``python -m fsad_pipeline.benchmark --serve``).

A real ``fsad-serve`` (uvicorn) in a child process on loopback, a real HTTP client (httpx) with
1, 4 and 16 concurrent clients, ``requests`` requests per level, one in ``bad_every`` of them a
bad input (not an image, a truncated PNG, a wrong content type) that must come back 4xx. Per
level: p50 / p95 / p99 latency of the good requests, throughput, status counts, the server's RSS
before and after. Midway through the run the server is killed (SIGKILL) and started again; the
champion's files must be byte for byte what they were. Results: ``<out>/serve.{json,md}``.

The model is ``--model`` (a bundle or champion folder), else the project's champion
(``models/champion``), else the default run is made and promoted in a scratch project first.
The images are the test images the model's run scored when its project is at hand, else the
built-in textile test images.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fsad_pipeline.benchmark.runs import PROJECT_ROOT, make_workdir

CONCURRENCY = (1, 4, 16)
#: Issue 19's targets (2 cores, 256 px, all default scorers).
TARGET_P50_ONE_CLIENT_MS, TARGET_P99_MS, TARGET_RSS_GROWTH_MIB = 200.0, 2000.0, 50.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (symlinks followed), by relative path."""
    folder = Path(folder).resolve()
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class ServerProcess:
    """``fsad-serve`` in a child process; :meth:`start` waits for ``/health``."""

    def __init__(self, model_dir: Path, log_path: Path, *, max_batch: int | None = None, queue_size: int | None = None):
        """``max_batch`` / ``queue_size``: None leaves the service's own defaults."""
        self.model_dir, self.log_path = Path(model_dir), Path(log_path)
        self.options = ["--reload-interval", "0"]
        for flag, value in (("--max-batch", max_batch), ("--queue-size", queue_size)):
            if value is not None:
                self.options += [flag, str(int(value))]
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> None:
        import httpx

        code = "import sys; from fsad_pipeline.console import serve_main; sys.exit(serve_main(sys.argv[1:]))"
        command = [sys.executable, "-c", code, "--model", str(self.model_dir), "--port", str(self.port),
                   "--device", "cpu", *self.options]
        env = {key: value for key, value in os.environ.items() if key != "FSAD_SERVE_TOKEN"}  # loopback, no token
        with open(self.log_path, "a") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                                            env={**env, "DO_NOT_TRACK": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fsad-serve exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"fsad-serve did not answer within {timeout} s; see {self.log_path}")

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def bad_inputs(good: bytes) -> list[tuple[bytes, str, int]]:
    """(body, content type, expected status) of the bad requests mixed into the load."""
    return [(b"this is not an image", "image/png", 422), (good[: len(good) // 3], "image/png", 422),
            (good, "text/plain", 415)]


#: A client that gets 503 (queue full) or no connection (server restarting) waits a random
#: 0.2-0.4 s and sends the same request again, as a camera station would; each such answer is
#: counted. (Retrying at once turns the 503s into a storm that takes CPU from the scoring.)
RETRY_SECONDS, RETRY_LIMIT_SECONDS = (0.2, 0.4), 120.0


async def _load(url: str, images: list[bytes], *, concurrency: int, requests: int, bad_every: int, seed: int,
                kill_after: int | None = None, on_kill=None, warmup: int = 0) -> dict[str, Any]:
    """``requests`` requests from ``concurrency`` clients; latencies of the good ones, status counts.

    A request answered 503, or met by a dead connection while the server restarts, is sent again
    after :data:`RETRY_SECONDS`; its latency runs from its last attempt (the answered one). The
    server's RSS is not read here. ``warmup`` good requests are sent first and not counted."""
    import httpx

    rng = random.Random(seed)
    plan = [("good", rng.choice(images), "image/png", 200) for _ in range(warmup)]
    for index in range(requests):
        if bad_every and index % bad_every == bad_every - 1:
            plan.append(("bad", *rng.choice(bad_inputs(rng.choice(images)))))
        else:
            plan.append(("good", rng.choice(images), "image/png", 200))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    unexpected: list[str] = []
    position = 0
    done = 0
    lock = asyncio.Lock()
    restarting = asyncio.Event()
    restarting.set()  # set: the server is up
    measured_from: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal position, done
        while True:
            async with lock:
                if position >= len(plan):
                    return
                index = position
                kind, body, content_type, expected = plan[index]
                position += 1
            counted = index >= warmup
            if counted and not measured_from:
                measured_from.append(time.perf_counter())
            deadline = time.monotonic() + RETRY_LIMIT_SECONDS
            while True:
                await restarting.wait()
                started = time.perf_counter()
                try:
                    response = await http.post(f"{url}/inspect", content=body, headers={"content-type": content_type})
                    status: int | str = response.status_code
                except httpx.HTTPError as error:  # the server was killed under this request
                    status = f"connection error ({type(error).__name__})"
                if counted:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                if (status == 503 or not isinstance(status, int)) and time.monotonic() < deadline:
                    await asyncio.sleep(rng.uniform(*RETRY_SECONDS))
                    continue
                break
            if not counted:
                continue
            elapsed = (time.perf_counter() - started) * 1000.0
            if kind == "good" and status == 200:
                latencies.append(elapsed)
            elif status != expected:
                unexpected.append(f"{kind} -> {status}")
            done += 1
            if kill_after is not None and done == kill_after and on_kill is not None:
                restarting.clear()  # the other clients hold their next request until the server is back
                await asyncio.to_thread(on_kill)
                restarting.set()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - (measured_from[0] if measured_from else time.perf_counter())
    values = np.asarray(latencies) if latencies else np.zeros(1)
    five_xx = sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500 and int(s) != 503)
    return {
        "concurrency": concurrency, "requests": requests, "good_answered": len(latencies), "wall_seconds": wall,
        "throughput_img_s": len(latencies) / wall if wall > 0 else None,
        "p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95)),
        "p99_ms": float(np.percentile(values, 99)), "statuses": statuses, "errors_5xx": five_xx,
        "unexpected": unexpected[:20], "n_unexpected": len(unexpected),
    }


def _images(model_dir: Path, count: int = 64) -> tuple[list[bytes], str]:
    """PNG bytes of up to ``count`` test images (the model's own project when present, else textile)."""
    from PIL import Image

    from fsad_pipeline.data.layouts import discover, materialise_textile

    project = Path(model_dir).resolve()
    while project != project.parent and not (project / "conf" / "base").is_dir():
        project = project.parent
    predictions = project / "data" / "07_model_output" / "predictions.csv"
    paths: list[str] = []
    if predictions.is_file():
        import pandas as pd

        table = pd.read_csv(predictions, keep_default_na=False)
        paths = [p if Path(p).is_absolute() else str(project / p) for p in table["path"]]
        source = str(predictions)
    if not paths:
        root = Path(tempfile.mkdtemp(prefix="fsad-serve-images-"))
        materialise_textile(root)
        paths = [r.path for r in discover("textile", root, "textile") if r.split == "test"]
        source = "built-in textile test images"
    paths = random.Random(0).sample(paths, min(count, len(paths)))
    images = []
    for path in paths:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images, source


def champion_for_benchmark(model: Path | None, scratch: Path) -> Path:
    """``model``, else the project's champion, else the default run promoted in a scratch project."""
    if model is not None:
        return Path(model)
    champion = PROJECT_ROOT / "models" / "champion"
    if champion.exists():
        return champion
    from fsad_pipeline.benchmark.runs import run_once

    workdir = make_workdir(scratch)
    print("[serve] no champion: running the default dfd chain and promoting it (minutes) ...", flush=True)
    run_once(workdir, "", log_path=scratch / "default_run.log")
    result = subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines=promotion"], cwd=workdir,
                            env={**os.environ, "DO_NOT_TRACK": "1"}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"promotion failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return workdir / "models" / "champion"


def serve_benchmark(model_dir: Path, out: Path, *, requests: int = 500, concurrency: tuple[int, ...] = CONCURRENCY,
                    bad_every: int = 10, max_batch: int | None = None, queue_size: int | None = None) -> dict[str, Any]:
    """The load test (module docstring); writes ``serve.json`` and ``serve.md`` and returns the record."""
    from fsad_pipeline.model_store.bundle import read_manifest

    out.mkdir(parents=True, exist_ok=True)
    images, source = _images(model_dir)
    manifest = read_manifest(Path(model_dir).resolve())
    batch_rate = (manifest.get("metrics") or {}).get("score_images_per_second")
    before_files = tree_digest(model_dir)
    from fsad_pipeline.inspection.service import ServiceSettings

    max_batch = int(max_batch or ServiceSettings.max_batch)  # the service's own defaults unless given
    queue_size = int(queue_size or ServiceSettings.queue_size)
    server = ServerProcess(model_dir, out / "serve_server.log", max_batch=max_batch, queue_size=queue_size)
    levels, restarts = [], []
    def kill_and_restart() -> None:
        server.kill()
        started = time.perf_counter()
        server.start()
        restarts.append({"after_requests": requests // 2, "restart_seconds": time.perf_counter() - started,
                         "champion_unchanged": tree_digest(model_dir) == before_files})

    try:
        server.start()
        for level in concurrency:
            killed = level == concurrency[len(concurrency) // 2]  # the middle level loses its server midway
            # Warm up at this concurrency first (the allocator's high-water mark for full batches is
            # not a leak), then read the RSS the run must not grow from.
            asyncio.run(_load(server.url, images, concurrency=level, requests=0, bad_every=0, seed=level,
                              warmup=4 * max(level, max_batch)))
            rss_before = server.rss_mib()
            result = asyncio.run(_load(server.url, images, concurrency=level, requests=requests, bad_every=bad_every,
                                       seed=level, kill_after=requests // 2 if killed else None,
                                       on_kill=kill_and_restart if killed else None))
            result.update(rss_before_mib=rss_before, rss_after_mib=server.rss_mib(), restarted=killed)
            result["rss_growth_mib"] = result["rss_after_mib"] - result["rss_before_mib"]
            levels.append(result)
            print(f"[serve] {level} client(s): p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
                  f"{result['throughput_img_s']:.2f} img/s, statuses {result['statuses']}", flush=True)
    finally:
        server.stop()
    record = {"model": str(Path(model_dir).resolve()), "images": source, "n_images": len(images),
              "requests_per_level": requests, "bad_every": bad_every, "max_batch": max_batch, "queue_size": queue_size,
              "batch_pipeline_img_s": batch_rate, "levels": levels, "restarts": restarts,
              "champion_unchanged": tree_digest(model_dir) == before_files, "cpu_count": os.cpu_count()}
    record["targets"] = serve_targets(record)
    (out / "serve.json").write_text(json.dumps(record, indent=2))
    (out / "serve.md").write_text(serve_markdown(record))
    return record


def serve_targets(record: dict) -> dict[str, Any]:
    """Issue 19's targets checked on a load-test record."""
    by_level = {level["concurrency"]: level for level in record["levels"]}
    one, many = by_level.get(1), by_level.get(max(by_level) if by_level else None)
    batch = record.get("batch_pipeline_img_s")
    clean = [level for level in record["levels"] if not level.get("restarted")]
    return {
        "p50_one_client_ms<=200": None if one is None else one["p50_ms"] <= TARGET_P50_ONE_CLIENT_MS,
        "throughput_16>=batch": None if many is None or not batch else many["throughput_img_s"] >= batch,
        "p99_16<=2000ms": None if many is None else many["p99_ms"] <= TARGET_P99_MS,
        "no_5xx_but_503": all(level["errors_5xx"] == 0 for level in clean),
        "bad_inputs_4xx": all(level["n_unexpected"] == 0 for level in clean),
        "rss_growth<=50MiB": all(level["rss_growth_mib"] <= TARGET_RSS_GROWTH_MIB for level in clean),
        "champion_unchanged_after_kill": record["champion_unchanged"] and all(r["champion_unchanged"] for r in record["restarts"]),
    }


def serve_markdown(record: dict) -> str:
    lines = ["# Inspection service load test", "",
             f"model `{record['model']}`; {record['n_images']} images ({record['images']}); "
             f"{record['requests_per_level']} requests per level, 1 in {record['bad_every']} a bad input; "
             f"max batch {record['max_batch']}; batch pipeline scoring: "
             f"{record['batch_pipeline_img_s'] or 'n/a'} img/s", "",
             "| clients | p50 ms | p95 ms | p99 ms | img/s | statuses | 5xx (not 503) | unexpected | RSS before → after MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for level in record["levels"]:
        note = " (server killed + restarted midway)" if level.get("restarted") else ""
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(level["statuses"].items()))
        lines.append(f"| {level['concurrency']}{note} | {level['p50_ms']:.0f} | {level['p95_ms']:.0f} | {level['p99_ms']:.0f} | "
                     f"{level['throughput_img_s']:.2f} | {statuses} | {level['errors_5xx']} | {level['n_unexpected']} | "
                     f"{level['rss_before_mib']:.0f} → {level['rss_after_mib']:.0f} |")
    for restart in record["restarts"]:
        lines.append(f"\nKilled after {restart['after_requests']} requests, restarted in {restart['restart_seconds']:.1f} s; "
                     f"champion files unchanged: {restart['champion_unchanged']}.")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'n/a' if met is None else ('yes' if met else '**no**')} |" for name, met in record["targets"].items()]
    return "\n".join(lines) + "\n"
