"""The HTTP inspection service: one image in, a verdict out, on the champion model kept in memory.

``fsad-serve`` (:func:`fsad_pipeline.console.serve_main`) runs :func:`create_app` under uvicorn.

* **The model.** :class:`ModelHolder` loads the bundle once (checksums verified) and keeps it,
  with its scorer ensemble, in one immutable :class:`LoadedModel`. A poller resolves the model
  folder every ``reload_interval`` seconds; when ``fsad-retrain`` (or a promotion) points the
  champion at another version, the new bundle is loaded and verified beside the old one and
  swapped in with one reference assignment. Each batch takes the reference once, so no request
  sees half a model; a bundle that fails its checks is refused and the old one kept
  (``GET /model`` says so).
* **Scoring** is the inspection path's: the same reader (:func:`decode_image_with_note`), the
  same fit to the working size (cover + centre crop, :func:`fit_to_size`), the same ensemble and
  fusion, the same threshold and defect-type classifier: a file scored here gets the score
  ``fsad-inspect`` gives it.
* **Micro-batching.** Requests wait in a bounded queue; one worker takes up to ``max_batch`` of
  them (waiting at most ``max_wait_ms`` for company) and scores them in one forward, in a worker
  thread so the event loop keeps accepting requests. A full queue answers 503 at once.
* **Bad input** gets a 4xx naming the problem (415 content type, 413 body or pixel count over
  the limits, 400 empty or missing file, 422 not decodable); nothing is logged as a traceback.
* **Access.** Loopback by default. Any other bind address needs ``FSAD_SERVE_TOKEN`` (checked as
  a bearer token with a constant-time compare on every endpoint but ``/health``); without it the
  service refuses to start. No endpoint accepts a path or writes a file.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from fsad_pipeline.data.geometry import fit_to_size
from fsad_pipeline.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image_with_note

logger = logging.getLogger(__name__)

TOKEN_ENV = "FSAD_SERVE_TOKEN"
LOOPBACK_NAMES = ("localhost",)
#: Content types taken as one raw encoded image in the request body.
RAW_IMAGE_TYPES = ("application/octet-stream",)
VERDICTS = {0: "OK", 1: "NG"}


class ServiceError(Exception):
    """A request the service answers with ``status`` and ``detail`` (never a traceback)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class QueueFull(ServiceError):
    def __init__(self, size: int):
        super().__init__(503, f"the inspection queue is full ({size} images waiting); retry shortly")


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and behaviour of one service (``fsad-serve`` flags)."""

    model_dir: Path
    host: str = "127.0.0.1"
    token: str | None = None
    device: str = "cpu"
    max_batch: int = 4
    max_wait_ms: float = 10.0
    queue_size: int = 4
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 16
    max_connections: int = 64
    reload_interval: float = 2.0
    threshold: float | None = None  # overrides the model's calibrated threshold (inference.threshold)
    expect: dict | None = None  # backbone / image_size / config_version the project expects of a model
    overlay_max_side: int | None = 1024
    overlay_alpha: float = 0.5


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse (ValueError) to serve on a non-loopback address without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to serve on {host}: another address than loopback needs a token. Set {TOKEN_ENV} "
            "(clients send 'Authorization: Bearer <token>') or bind to 127.0.0.1"
        )


# --------------------------------------------------------------------------------------------
# the model in memory, and its hot reload
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    """One loaded bundle and its ensemble; replaced whole, never changed in place."""

    bundle: Any  # ModelBundle
    ensemble: Any  # ScorerEnsemble
    path: Path  # the resolved version folder
    content_hash: str | None
    version: str | None
    loaded_at: str
    identity: tuple = ()  # what _identity said of the folder loaded, read before loading it

    def describe(self) -> dict:
        bundle = self.bundle
        return {
            "version": self.version,
            "path": str(self.path),
            "content_hash": self.content_hash,
            "backbone": bundle.backbone,
            "image_size": list(bundle.image_size),
            "threshold": float(bundle.threshold["threshold"]),
            "threshold_method": bundle.threshold.get("method"),
            "expected_false_alarm_rate": bundle.threshold.get("expected_false_alarm_rate"),
            "scorers": list(bundle.fusion.scorers),
            "classifier": bundle.classifier is not None,
            "data_fingerprint": bundle.manifest.get("data_fingerprint"),
            "config_version": bundle.manifest.get("config_version"),
            "loaded_at": self.loaded_at,
        }


def _identity(model_dir: Path) -> tuple[Path, str | None, int]:
    """(resolved folder, manifest content hash, manifest mtime) of what ``model_dir`` points at now
    (the mtime: a refused bundle repaired in place is tried again)."""
    from fsad_pipeline.model_store.bundle import MANIFEST_FILE, read_manifest

    resolved = Path(model_dir).resolve()
    return resolved, read_manifest(resolved).get("content_hash"), (resolved / MANIFEST_FILE).stat().st_mtime_ns


def load_model(model_dir: Path, *, device: str = "cpu", loader: Callable[..., Any] | None = None,
               expect: dict | None = None) -> LoadedModel:
    """Load and verify the bundle ``model_dir`` points at (refusing one that does not match
    ``expect``, as ``fsad-inspect`` does), with its ensemble ready to score."""
    from fsad_pipeline.model_store.bundle import load_bundle

    identity = _identity(model_dir)
    path, content_hash, _ = identity
    bundle = (loader or load_bundle)(path, expect, device=device)
    ensemble = bundle.ensemble()  # its banks show no progress bars of their own
    promotion = bundle.promotion or {}
    return LoadedModel(bundle, ensemble, path, content_hash, promotion.get("version") or path.name,
                       datetime.now(timezone.utc).isoformat(timespec="seconds"), identity)


class ModelHolder:
    """The current model; :meth:`refresh` swaps in a newly promoted champion (see module doc)."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", loader: Callable[..., Any] | None = None,
                 expect: dict | None = None):
        self.model_dir = Path(model_dir)
        self.device = device
        self.expect = expect
        self._loader = loader
        self._current = load_model(self.model_dir, device=device, loader=loader, expect=expect)
        # The identity of what was loaded, not of what the link says now: a promotion landing
        # during this first load must look like a change to the next refresh().
        self._identity = self._current.identity
        self._refresh_lock = threading.Lock()
        self.reloads = 0
        self.last_reload_error: str | None = None
        self.refused: tuple | None = None  # a bundle that failed; not retried until it changes

    @property
    def current(self) -> LoadedModel:
        return self._current

    def refresh(self) -> bool:
        """Load and swap in the bundle ``model_dir`` points at if it changed; True when swapped.

        A bundle that fails to load (checksums, mismatch, half-written) is refused: the current
        model stays, the error is kept for ``/model``, and that same bundle is not tried again."""
        with self._refresh_lock:
            try:
                identity = _identity(self.model_dir)
            except Exception as error:  # the link is being swapped, or the store is gone for a moment
                self.last_reload_error = f"{type(error).__name__}: {error}"
                return False
            if identity == self._identity:
                self.last_reload_error = None  # a passing glitch (a link being swapped) is over
                return False
            if identity == self.refused:
                return False
            try:
                model = load_model(self.model_dir, device=self.device, loader=self._loader, expect=self.expect)
            except Exception as error:
                self.refused = identity
                self.last_reload_error = f"{identity[0].name} refused: {type(error).__name__}: {error}"
                logger.warning("model reload refused, keeping %s: %s", self._current.version, self.last_reload_error)
                return False
            previous = self._current.version
            self._current, self._identity = model, identity  # a batch uses the old or the new model
            self.reloads += 1
            self.refused, self.last_reload_error = None, None
            logger.info("model reloaded: %s -> %s", previous, model.version)
            return True


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
@dataclass
class Upload:
    """One image brought to a model's working size, waiting to be scored (the decoded file itself
    is not kept: a queue of full-resolution images would be unbounded in memory)."""

    name: str
    image: np.ndarray  # uint8 RGB at the working size it was fitted to
    original_size: tuple[int, int]  # (height, width) of the file
    note: str
    heatmap: bool
    decode_ms: float
    queued_at: float = field(default_factory=time.perf_counter)


def _number(value: float) -> float | None:
    """A JSON-safe float: None for NaN and infinities."""
    value = float(value)
    return value if np.isfinite(value) else None


def score_uploads(model: LoadedModel, uploads: Sequence[Upload], *, overlay_max_side: int | None = 1024,
                  overlay_alpha: float = 0.5, threshold: float | None = None) -> list[dict]:
    """Score ``uploads`` in one forward with ``model``: the answers, in order (see module doc).

    An upload fitted to another working size (a model of another size was swapped in while it
    waited) is fitted again. A score that is not a number is an NG verdict, never an OK one."""
    from fsad_pipeline.evaluation.figures import heatmap_overlay_image
    from fsad_pipeline.inspection.inspector import classify_flagged, overlay_size

    bundle, ensemble = model.bundle, model.ensemble
    started = time.perf_counter()
    size = tuple(bundle.image_size)
    images = np.stack([u.image if u.image.shape[:2] == size else fit_to_size(u.image, size) for u in uploads])
    outputs = ensemble.score_each(images)
    fused = ensemble.fusion.fuse(outputs)
    threshold = float(bundle.threshold["threshold"]) if threshold is None else float(threshold)
    scores = np.asarray(fused["pred_score"], dtype=np.float64)
    labels = (~(scores < threshold)).astype(int)  # NaN: NG
    defect = classify_flagged(bundle, images, fused["anomaly_map"], labels == 1)
    score_ms = (time.perf_counter() - started) * 1000.0
    display = bundle.fusion.map_display_range()
    answers = []
    for row, upload in enumerate(uploads):
        height, width = upload.original_size
        answer: dict[str, Any] = {
            "pred_score": _number(scores[row]),
            "pred_label": int(labels[row]),
            "verdict": VERDICTS[int(labels[row])],
            "threshold": threshold,
            "model_version": model.version,
            "scores": {name: _number(outputs[name]["pred_score"][row]) for name in bundle.fusion.scorers},
            "image": {"name": upload.name, "width": int(width), "height": int(height), "converted": upload.note or None},
            "timings_ms": {"decode": upload.decode_ms, "queue": (started - upload.queued_at) * 1000.0,
                           "score_batch": score_ms, "batch_size": len(uploads)},
        }
        if defect is not None:
            flagged = labels[row] == 1
            answer["defect_type"] = (str(defect["pred_defect_type"][row]) or "unknown") if flagged else None
            answer["defect_probability"] = _number(defect["pred_defect_probability"][row]) if flagged else None
        if upload.heatmap:
            caption = f"{answer['verdict']} {scores[row]:.3f}"
            if answer.get("defect_type"):
                caption += f" {answer['defect_type']}"
            overlay = heatmap_overlay_image(
                images[row], fused["anomaly_map"][row], alpha=overlay_alpha,
                **dict(zip(("vmin", "vmax"), display)), size=overlay_size((height, width), overlay_max_side),
                caption=caption,
            )
            answer["heatmap_png"] = base64.b64encode(_png_bytes(overlay)).decode("ascii")
        answers.append(answer)
    return answers


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


class MicroBatcher:
    """A bounded queue of uploads and one worker that scores them in batches (see module doc)."""

    def __init__(self, score: Callable[[list[Upload]], list[dict]], *, max_batch: int = 8,
                 max_wait_ms: float = 10.0, queue_size: int = 32):
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be at least 1")
        self.score = score
        self.max_batch, self.max_wait = int(max_batch), float(max_wait_ms) / 1000.0
        self.queue: asyncio.Queue[tuple[Upload, asyncio.Future]] = asyncio.Queue(maxsize=int(queue_size))
        self.batches = 0
        self._task: asyncio.Task | None = None
        # One scoring thread: batches run one after the other, and few threads mean few malloc
        # arenas (a thread per request made the RSS creep under load).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsad-score")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    def free(self) -> int:
        """Places left in the queue."""
        return self.queue.maxsize - self.queue.qsize()

    def check_room(self, count: int = 1) -> None:
        """Raise :class:`QueueFull` unless ``count`` more uploads fit (checked before decoding them)."""
        if self.free() < count:
            raise QueueFull(self.queue.maxsize)

    async def submit(self, upload: Upload) -> dict:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((upload, future))
        except asyncio.QueueFull:
            raise QueueFull(self.queue.maxsize) from None
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    batch.append(self.queue.get_nowait() if remaining <= 0 else
                                 await asyncio.wait_for(self.queue.get(), remaining))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            batch = [(upload, future) for upload, future in batch if not future.cancelled()]
            if not batch:
                continue
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._score_isolated, [upload for upload, _ in batch])
            self.batches += 1
            for (_, future), outcome in zip(batch, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _score_isolated(self, uploads: list[Upload]) -> list[dict | Exception]:
        """The batch's answers; when the batch fails, each upload is scored alone, so only the
        one that fails gets the error (one log line per failing upload, no traceback)."""
        try:
            return list(self.score(uploads))
        except Exception as error:
            if len(uploads) > 1:
                return [self._score_isolated([upload])[0] for upload in uploads]
            logger.error("scoring %s failed: %s: %s", uploads[0].name, type(error).__name__, error)
            return [ServiceError(500, "the model could not score this image")]


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------
async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ServiceError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
        except ValueError:
            raise ServiceError(400, "malformed Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _files_from(request, settings: ServiceSettings, *, many: bool) -> list[tuple[str, bytes]]:
    """``(name, encoded bytes)`` of the uploaded image(s): a raw image body or multipart parts."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = content_type.startswith("image/") or content_type in RAW_IMAGE_TYPES
    if raw and many:
        raise ServiceError(415, "a batch is sent as multipart/form-data with one part per image")
    if not raw and content_type != "multipart/form-data":
        raise ServiceError(
            415, f"unsupported content type {content_type or '(none)'!r}: send the image as image/*, "
                 "application/octet-stream or multipart/form-data")
    body = await _read_body(request, settings.max_body_bytes)
    if raw:
        return [("body", body)]

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=settings.max_files, max_fields=settings.max_files,
                             max_part_size=settings.max_body_bytes)
    parser.spool_max_size = settings.max_body_bytes  # parts stay in memory: the service writes no file
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ServiceError(400, f"malformed multipart body: {error.message}") from None
    files = [(value.filename or key, await value.read()) for key, value in form.multi_items() if hasattr(value, "read")]
    if not files:
        raise ServiceError(400, "no image file in the multipart body (send it as a file part)")
    if not many and len(files) > 1:
        raise ServiceError(400, f"{len(files)} files sent to /inspect: send one, or use /inspect/batch")
    return files


def _decode(name: str, data: bytes, settings: ServiceSettings, heatmap: bool, size: tuple[int, int]) -> Upload:
    """Decode (the project's reader) and fit to the working ``size`` (as inspection does); run in a
    worker thread, so a large file does not stall the event loop."""
    started = time.perf_counter()
    try:
        image, note = decode_image_with_note(data, max_pixels=settings.max_pixels, name=name)
    except BadImageError as error:
        status = 413 if "decompression-bomb guard" in error.reason else (400 if error.reason == "zero-byte file" else 422)
        raise ServiceError(status, f"{name}: {error.reason}") from None
    fitted = fit_to_size(image, size)
    return Upload(name, fitted, tuple(image.shape[:2]), note, heatmap, (time.perf_counter() - started) * 1000.0)


def create_app(settings: ServiceSettings, *, holder: ModelHolder | None = None, loader: Callable[..., Any] | None = None):
    """The FastAPI application (the model is loaded here unless ``holder`` is given)."""
    check_bind(settings.host, settings.token)
    holder = holder or ModelHolder(settings.model_dir, device=settings.device, loader=loader, expect=settings.expect)

    def score(uploads: list[Upload]) -> list[dict]:
        return score_uploads(holder.current, uploads, overlay_max_side=settings.overlay_max_side,
                             overlay_alpha=settings.overlay_alpha, threshold=settings.threshold)

    batcher = MicroBatcher(score, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                           queue_size=settings.queue_size)

    # Decoding and fitting uploads: two threads at most, off the event loop (see MicroBatcher).
    decoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fsad-decode")

    async def decode(*arguments) -> Upload:
        return await asyncio.get_running_loop().run_in_executor(decoders, _decode, *arguments)

    async def poll_champion() -> None:
        while True:
            await asyncio.sleep(settings.reload_interval)
            await asyncio.to_thread(holder.refresh)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        poller = asyncio.get_running_loop().create_task(poll_champion()) if settings.reload_interval > 0 else None
        logger.info("serving model %s on %s", holder.current.version, settings.host)
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            await batcher.stop()
            decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fsad_pipeline inspection service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.holder, app.state.batcher, app.state.settings = holder, batcher, settings

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError):
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    @app.middleware("http")
    async def authorise_and_guard(request: Request, call_next):
        if settings.token and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        try:
            return await call_next(request)
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing to log
            return JSONResponse({"detail": "client disconnected"}, status_code=400)
        except Exception as error:  # a bug: one line in the log, a 500, no traceback, the service lives on
            logger.error("%s %s failed: %s: %s", request.method, request.url.path, type(error).__name__, error)
            return JSONResponse({"detail": "internal error"}, status_code=500)

    def _wants_heatmap(request: Request) -> bool:
        value = request.query_params.get("heatmap")
        if value not in (None, "png"):
            raise ServiceError(400, f"heatmap must be 'png', got {value!r}")
        return value == "png"

    @app.get("/health")
    async def health():  # open to probes: with a token set it names no model
        return {"status": "ok"} if settings.token else {"status": "ok", "model_version": holder.current.version}

    @app.get("/model")
    async def model():
        described = holder.current.describe()
        if settings.threshold is not None:
            described.update(threshold=float(settings.threshold), threshold_method="override",
                             model_threshold=float(holder.current.bundle.threshold["threshold"]))
        return {**described, "reloads": holder.reloads, "last_reload_error": holder.last_reload_error,
                "limits": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                           "queue_size": settings.queue_size, "max_body_bytes": settings.max_body_bytes,
                           "max_pixels": settings.max_pixels,
                           "max_files_per_batch": min(settings.max_files, settings.queue_size)}}

    @app.post("/inspect")
    async def inspect(request: Request):
        started = time.perf_counter()
        heatmap = _wants_heatmap(request)
        batcher.check_room()  # a full queue answers at once, before the body is read or decoded
        (name, data), = await _files_from(request, settings, many=False)
        upload = await decode(name, data, settings, heatmap, tuple(holder.current.bundle.image_size))
        answer = await batcher.submit(upload)
        answer["timings_ms"]["total"] = (time.perf_counter() - started) * 1000.0
        return answer

    @app.post("/inspect/batch")
    async def inspect_batch(request: Request):
        started = time.perf_counter()
        heatmap = _wants_heatmap(request)
        batcher.check_room()
        files = await _files_from(request, settings, many=True)
        if len(files) > settings.queue_size:  # would never fit: "retry shortly" would be a lie
            raise ServiceError(413, f"{len(files)} files: at most {settings.queue_size} per batch (the queue's size, "
                                    "queue_size); split the batch or raise queue_size")
        batcher.check_room(len(files))  # the whole batch is queued or refused: no partial 503s
        size = tuple(holder.current.bundle.image_size)

        async def one(name: str, data: bytes) -> dict:
            upload = await decode(name, data, settings, heatmap, size)
            return await batcher.submit(upload)

        results = []
        for (name, _), outcome in zip(files, await asyncio.gather(*(one(n, d) for n, d in files), return_exceptions=True)):
            if isinstance(outcome, ServiceError):
                results.append({"name": name, "status": outcome.status, "detail": outcome.detail})
            elif isinstance(outcome, Exception):
                logger.error("scoring %s failed: %s: %s", name, type(outcome).__name__, outcome)
                results.append({"name": name, "status": 500, "detail": "internal error"})
            else:
                results.append({"name": name, "status": 200, **outcome})
        return {"results": results, "timings_ms": {"total": (time.perf_counter() - started) * 1000.0}}

    return app


def settings_summary(settings: ServiceSettings) -> str:
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items() if k != "token"})
