"""`embedpipe serve HEAD`: an HTTP API (FastAPI + uvicorn) that classifies uploaded images.

The backbone is rebuilt once at start-up exactly as the head's manifest says (model, weights
checked by sha256, preprocessing, pool, precision) and every upload is decoded, transformed and
run like `embedpipe extract` does it (the same data.decode_image with the same reduced-size
JPEG draft, the same views transform and test-time augmentation, extract.embed), so ``/predict`` answers what
`embedpipe predict HEAD IMAGE` answers for the same file.

    POST /predict   multipart upload: field ``file`` (one image) or ``files`` (several);
                    optional ``?top_k=N``. 200 → {"predictions": [{"filename", "class",
                    "confidence", "top_k": [{"class", "probability"}, ...]}, ...]}
    GET  /health    {"status": "ok"}
    GET  /info      backbone, weights, data config, head, classes, versions, limits
    GET  /metrics   request/image/batch counters (batching evidence)

Errors are JSON ``{"detail": "..."}`` with a 4xx status: 400 no file / malformed multipart,
413 request body over --max-upload-mb (refused from Content-Length before the body is read,
or as soon as a streamed body passes the limit) or an image over --max-pixels, 422 an upload
that is not a decodable image.

Uploads that arrive together are batched: each decoded image joins a queue; one batcher task
takes up to --max-batch of them, waiting at most --batch-wait-ms for more after the first, and
runs the backbone and head in a single worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import UserError
from .heads import artifacts


class ServeError(UserError):
    """A bad serve option or a head that cannot be served; one line with the fix."""


try:  # the `serve` extra; FastAPI needs these at module level to resolve annotations
    try:  # python-multipart, for form parsing (older releases: `multipart`)
        import python_multipart  # noqa: F401
    except ImportError:
        import multipart  # noqa: F401
    import uvicorn
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise ServeError(f"`embedpipe serve` needs {e.name or 'fastapi'}, which is not installed; "
                     "run `pip install 'embedpipe[serve]'`") from None

DEFAULT_MAX_PIXELS = 40_000_000  # a server default below Pillow's 89 MP: ~120 MB decoded RGB
MAX_FILES = 64  # uploads per request


class BodyTooLarge(Exception):
    """Raised from the wrapped ASGI receive when a request body passes the size limit."""


@dataclass
class Settings:
    max_batch: int = 32
    batch_wait_ms: float = 10.0
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    top_k: int = 3
    max_files: int = MAX_FILES
    reject: str | None = None  # as `predict --reject`: auto, none or a confidence

    def check(self) -> None:
        if self.max_batch < 1:
            raise ServeError(f"--max-batch {self.max_batch}: pass 1 or more")
        if self.batch_wait_ms < 0:
            raise ServeError(f"--batch-wait-ms {self.batch_wait_ms}: pass 0 or more")
        if self.max_upload_bytes < 1:
            raise ServeError("--max-upload-mb: pass a positive size in MB")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ServeError(f"--max-pixels {self.max_pixels}: pass a positive number")
        if self.top_k < 1:
            raise ServeError(f"--top-k {self.top_k}: pass 1 or more")


# -- the model ---------------------------------------------------------------------------------

class Model:
    """A head plus the backbone its manifest names, ready to classify decoded uploads."""

    def __init__(self, head_path: str | Path, *, weights: str | None = None,
                 device: str = "auto", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 runtime: str = "auto", reject: str | None = None,
                 max_batch: int | None = None):
        """Raises ServeError (one line) for a head that cannot be served here and, with
        ``max_batch`` (--max-batch), when a batch of that many images does not fit in the
        memory available now (extract.runtime.check_batch_memory, before the runtime is
        built), naming the largest --max-batch that does."""
        import torch

        from .heads.reject import rule_for

        from .backbones import decode_size, build_backbone, make_views_transform
        from .extract.runtime import (build_engine, check_batch_memory, resolve_device,
                                      resolve_precision)
        from .extract.options import options_for_identity
        from .provenance import identity_of

        self.head = artifacts.load(head_path, compact=True)  # its compact form when it has one
        self.rule = rule_for(self.head.manifest, reject, str(self.head.path))
        opts = options_for_identity(self.head.identity, weights=weights, device=device,
                                    what=str(self.head.path), runtime=runtime)
        self.device = resolve_device(opts.device)
        self.precision = resolve_precision(opts.precision, self.device)
        self.backbone = build_backbone(opts)
        if max_batch:  # a batch of --max-batch uploads (and their --tta views) in one forward
            check_batch_memory(self.backbone, opts, self.device, max_batch, error=ServeError,
                               flag="--max-batch")
        data_config, identity = identity_of(self.backbone, opts, self.precision)
        # As extract sets up its model (the forward itself is runtime.embed, via the engine).
        self.engine = build_engine(self.backbone, self.device, self.precision, opts.runtime,
                                   channels_last=opts.channels_last,
                                   hint="latency")  # a request's few images, at once
        identity["precision"] = self.precision = self.engine.stored_precision
        # Model, weights sha256, data config, pool and feature dim must equal the head's.
        self.notes = artifacts.check_compatible(self.head, identity,
                                                f"the backbone rebuilt for {self.head.path}")
        self.identity = identity
        self.data_config = data_config
        self.dtype = np.dtype(opts.dtype)
        self.channels_last = opts.channels_last
        self.min_size = None if opts.exact_decode else decode_size(self.backbone.data_config)
        self.max_pixels = max_pixels
        self.flip = "flip" in (data_config.get("tta") or "")
        self.transform = make_views_transform(data_config)  # image → V×C×H×W views
        self.backbone.model = None  # the engine holds what runs (OpenVINO: torch's is unused)
        self._torch = torch
        self.calibrated = True
        # Warm up (first calls allocate) and learn whether the head's scores are calibrated.
        from PIL import Image

        side = int(self.backbone.data_config["input_size"][-1])
        self.calibrated = self.run([self.transform(Image.new("RGB", (side, side)))])[0].get(
            "calibrated", True)

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    def preprocess(self, data: bytes) -> Any:
        """Upload bytes → the model's input tensor, exactly as extraction decodes a file.
        Raises data.DecodeError with a reason for anything that is not a usable image."""
        from .data import DecodeError, decode_image

        img = decode_image(data, min_size=self.min_size, max_pixels=self.max_pixels)
        try:
            return self.transform(img)
        except Exception as e:  # noqa: BLE001 - as in extraction: this upload's failure
            raise DecodeError(f"preprocessing failed: {type(e).__name__}: {e}") from None

    def run(self, tensors: list[Any]) -> list[dict[str, Any]]:
        """Classify a batch of preprocessed images (call from one thread at a time)."""
        from .backbones import stack_views
        from .predict import predict_rows

        torch = self._torch
        views = stack_views(tensors)  # B×V×H×W×3 uint8 (or B×V×C×H×W float)
        with torch.inference_mode():
            feats = self.engine(views, flip=self.flip,
                                chunk=max(1, views.shape[0] * views.shape[1])).cpu().numpy()
        # Round through the head's store dtype, as `embedpipe predict` reads its store.
        X = feats.astype(self.dtype, copy=False).astype(np.float32, copy=False)
        # an upload whose features overflowed gets extraction's per-image failure, not a head's
        # ValueError for the whole batch (checks.unusable_rows; extract.plan)
        from . import checks
        from .extract.plan import UNUSABLE_FEATURES

        bad = checks.unusable_rows(X)
        out: list[dict[str, Any]] = [
            {"error": UNUSABLE_FEATURES.format(limit=checks.FEATURE_LIMIT)} for _ in X]
        good = np.setdiff1d(np.arange(len(X)), bad)
        if not len(good):
            return out
        X = X[good]
        predicted, conf, top, calibrated = predict_rows(self.head, X, len(self.classes))
        if self.rule is not None:  # --reject: as `embedpipe predict --reject`
            from .heads.reject import UNKNOWN

            unknown = self.rule.mask(conf, X)
            predicted = [UNKNOWN if u else p for p, u in zip(predicted, unknown)]
        for i, p, c, t in zip(good, predicted, conf, top):
            out[int(i)] = {"class": p, "confidence": float(c), "top": t,
                           "calibrated": calibrated}
        return out

    def info(self) -> dict[str, Any]:
        w = self.backbone.weights
        m = self.head.manifest
        return {
            "backbone": {"model": self.backbone.name, "pool": self.backbone.pool,
                         "feature_dim": self.backbone.feature_dim,
                         "weights": {"source": w.source, "location": w.location,
                                     "sha256": w.sha256},
                         "data_config": self.data_config, "precision": self.precision,
                         "runtime": self.engine.record(),
                         "dtype": str(self.dtype), "device": str(self.device)},
            "head": {"path": str(self.head.path), "head": m.get("head"),
                     "params": m.get("params"), "effective_params": m.get("effective_params"),
                     "calibration": m.get("calibration"), "probabilities": m.get("probabilities"),
                     "calibrated": self.calibrated, "created": m.get("created"),
                     "reject": None if self.rule is None else self.rule.record()},
            "classes": self.classes,
            "versions": {"head": m.get("versions", {}), "server": _server_versions()},
            "notes": self.notes,
        }


def _server_versions() -> dict[str, str]:
    from .env import EXTRACT, versions

    return versions(*EXTRACT, "scikit-learn", "fastapi", "uvicorn", "starlette")


# -- batching ----------------------------------------------------------------------------------

@dataclass
class Stats:
    requests: int = 0
    images: int = 0
    batches: int = 0
    largest_batch: int = 0
    rejected: int = 0
    model_seconds: float = 0.0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "images": self.images, "batches": self.batches,
                "largest_batch": self.largest_batch,
                "mean_batch": round(self.images / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "rejected": self.rejected, "model_seconds": round(self.model_seconds, 3)}


class Batcher:
    """Collects images from concurrent requests into batches for one model thread."""

    def __init__(self, run: Callable[[list[Any]], list[dict[str, Any]]], max_batch: int,
                 max_wait_s: float, stats: Stats):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_s
        self.stats = stats
        self.pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="embedpipe-model")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.pending:
            _, fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))
        self.executor.shutdown(wait=True)

    async def submit(self, tensors: list[Any]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in tensors]
        self.pending.extend(zip(tensors, futs))
        assert self._wake is not None
        self._wake.set()
        return list(await asyncio.gather(*futs))

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            deadline = loop.time() + self.max_wait
            while len(self.pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self.pending.popleft()
                     for _ in range(min(self.max_batch, len(self.pending)))]
            batch = [(t, f) for t, f in batch if not f.done()]  # cancelled: client went away
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run,
                                                     [t for t, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.stats.model_seconds += time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.batch_sizes[len(batch)] += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)


# -- request size limit ------------------------------------------------------------------------

class LimitBody:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413. A declared Content-Length
    over the limit is refused before any of the body is read; a longer body than declared or a
    chunked one is cut off (BodyTooLarge) as soon as it passes the limit."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                await _json(send, 400, "bad Content-Length header")
                return
            if too_big:
                await _json(send, 413, _too_large(self.limit, f"{int(declared)} bytes"))
                return
        seen = 0
        limit = self.limit

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(_too_large(limit, f"more than {limit} bytes"))
            return message

        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked_send)
        except BodyTooLarge as e:  # raised where the app did not turn it into a response
            if not started:
                await _json(send, 413, str(e))


def _too_large(limit: int, got: str) -> str:
    return (f"request body too large ({got}; limit {limit} bytes = {limit / 2**20:g} MB); send "
            "fewer or smaller images per request, or start the server with a larger "
            "--max-upload-mb")


async def _json(send: Callable, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# -- the app -----------------------------------------------------------------------------------

def create_app(model: Model, settings: Settings) -> Any:
    from .data import DecodeError

    stats = Stats()
    batcher = Batcher(model.run, settings.max_batch, settings.batch_wait_ms / 1000, stats)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="embedpipe", lifespan=lifespan, docs_url=None, redoc_url=None)

    def reject(status: int, detail: str) -> JSONResponse:
        stats.rejected += 1
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return reject(413, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code < 500:
            stats.rejected += 1
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - started, 1)}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {**model.info(), "limits": {
            "max_batch": settings.max_batch, "batch_wait_ms": settings.batch_wait_ms,
            "max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
            "max_files": settings.max_files, "top_k": settings.top_k}}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return stats.as_dict()

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = Query(None, ge=1)) -> Any:
        k = min(top_k or settings.top_k, len(model.classes))
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return reject(400, "no file: send the image as multipart/form-data in a field "
                               "named `file` (or several in `files`), e.g. "
                               "`curl -F file=@photo.jpg http://HOST:PORT/predict`")
        try:
            form = await request.form(max_files=settings.max_files, max_fields=16)
        except BodyTooLarge as e:
            return reject(413, str(e))
        except StarletteHTTPException as e:  # malformed multipart, too many files
            return reject(e.status_code, f"bad multipart upload: {e.detail}")
        try:
            uploads = [v for key in ("file", "files") for v in form.getlist(key)]
            other = sorted({key for key, v in form.multi_items()
                            if isinstance(v, UploadFile) and key not in ("file", "files")})
            if not uploads:
                hint = f" (got file field(s) {', '.join(other)})" if other else ""
                return reject(400, f"no file: upload the image in a field named `file` (or "
                                   f"several in `files`){hint}")
            if any(not isinstance(u, UploadFile) for u in uploads):
                return reject(400, "`file`/`files` must be file uploads, not text fields")
            names, tensors = [], []
            for i, up in enumerate(uploads):
                name = up.filename or f"upload-{i + 1}"
                data = await up.read()
                try:
                    tensors.append(await run_in_threadpool(model.preprocess, data))
                except DecodeError as e:
                    reason = str(e)
                    status = 413 if reason.startswith("decompression bomb") else 422
                    if status == 413:
                        reason = reason.replace("(raise --max-pixels)",
                                                "(the server's --max-pixels)")
                    return reject(status, f"{name}: {reason}")
                names.append(name)
        finally:
            await form.close()
        stats.requests += 1
        stats.images += len(tensors)
        results = await batcher.submit(tensors)
        failed = [(n, r["error"]) for n, r in zip(names, results) if "error" in r]
        if failed:  # as an upload that does not decode: 422 naming it
            return reject(422, f"{failed[0][0]}: {failed[0][1]}")
        return {"predictions": [
            {"filename": n, "class": r["class"], "confidence": r["confidence"],
             "top_k": [{"class": c, "probability": p} for c, p in r["top"][:k]]}
            for n, r in zip(names, results)]}

    return LimitBody(app, settings.max_upload_bytes)


# -- running -----------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket, so a busy port fails before the model loads.
    Raises ServeError for a port outside 0-65535 (socket raises OverflowError for those) or one
    that cannot be bound (in use, not allowed, an unknown host)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port}: pass a TCP port from 0 to 65535 (0 for any free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another "
                         "--port (or --port 0 for any free one) or --host") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(head: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          settings: Settings | None = None, weights: str | None = None, device: str = "auto",
          runtime: str = "auto", say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
    """Load the model, listen, and serve until Ctrl-C (SIGINT) or SIGTERM. The port is bound
    first (a busy one is refused before the model loads) and listened on only once the model
    is loaded and a batch of --max-batch images is known to fit in memory (Model)."""
    settings = settings or Settings()
    settings.check()
    sock = bind(host, port)
    try:
        t0 = time.perf_counter()
        model = Model(head, weights=weights, device=device, max_pixels=settings.max_pixels,
                      runtime=runtime, reject=settings.reject, max_batch=settings.max_batch)
        for note in model.backbone.notes + model.notes:
            say(note)
        say(f"loaded {model.head.path} ({model.head.manifest.get('head', 'head')}, "
            f"{len(model.classes)} classes) on {model.backbone.name} "
            f"[{model.device}, {model.engine.describe()}, {model.precision}] in {time.perf_counter() - t0:.1f} s")
        app = create_app(model, settings)
        url = url_of(sock)

        class _Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if self.started:
                    say(f"embedpipe serve: listening on {url} (POST /predict, GET /health, "
                        "GET /info; Ctrl-C to stop)")

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=10)
        server = _Server(config)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
        # handler that was there before it: make that a no-op, so Ctrl-C ends with "stopped"
        # and exit status 0 rather than a KeyboardInterrupt inside the event loop.
        main = threading.current_thread() is threading.main_thread()
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in sigs} if main else {}
        for s in previous:
            signal.signal(s, _ignore)
        try:
            server.run(sockets=[sock])
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        say("embedpipe serve: stopped")
    finally:
        sock.close()


def _ignore(signum: int, frame: Any) -> None:
    """Stands in for SIGINT/SIGTERM handlers while uvicorn runs (it installs its own)."""
