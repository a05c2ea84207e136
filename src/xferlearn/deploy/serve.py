"""The HTTP service: a trained run behind `POST /predict`, `GET /health`, `GET /model` and an upload page.

`create_app(run)` gives a FastAPI app; `serve(run)` runs it with uvicorn on 127.0.0.1. An upload is
decoded with `predictor.decode(bytes)`, as `xferlearn predict` decodes a file, so both give the same
answer. A bad request gets a 4xx and a one-line JSON `{"error": ...}` and the server goes on: the
body is counted as it arrives and refused past the limit, the pixel count is read from the header
before decoding, and decodes run in the thread pool, outside any lock, as many at once as cores and
memory allow (guards.py), which bounds the memory a burst of large uploads can take. Requests
reaching a busy model wait on one lock; whoever gets it runs everything queued as one batch, so a
burst costs few forward passes and nobody waits for a timer. The batch runs on the engine chosen
with `engine` (config.ENGINES: PyTorch, or ONNX Runtime fp32 or int8, which has its own validation
threshold); Grad-CAM needs PyTorch, so explanations use the checkpoint's network whatever the
engine, hold the lock, and are loaded on first request.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .. import __version__
from .._io import file_sha256, plain
from ..config import ENGINES
from ..data.images import UnreadableImage
from ..errors import XferlearnError
from ..models.checkpoint import Checkpoint, load_checkpoint
from ..models.predictor import BasePredictor, Predictor, load_predictor
from ..rundir import checkpoint_path
from .batching import BatchingRunner
from .guards import decode_slots, without_paths
from .predict import resolve_engine, why_not_int8

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 20 * 2**20
# Far above any radiograph (~18 MP) and half the decoder's own bound: a 50 MP decode takes 150 MB.
DEFAULT_MAX_PIXELS = 50_000_000
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file
CHUNK = 1 << 20
ACCEPTED_TYPES = "image/* or application/octet-stream"


# --- the API's shapes (they make /openapi.json) ----------------------------------------
class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong with the request, in one line")


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    file: str | None = Field(description="the uploaded file's name")
    class_: str = Field(alias="class", description="the predicted class")
    probabilities: dict[str, float] = Field(description="calibrated probability per class")
    threshold: float | None = Field(description="decision threshold on the positive class (binary models)")
    threshold_source: str
    positive_class: str | None
    model_id: str
    heatmap_png_base64: str | None = Field(None, description="Grad-CAM overlay PNG; only with ?explain=true")


class Health(BaseModel):
    status: Literal["ok"]
    model_id: str
    engine: str = Field(description="what computes the probabilities: " + ", ".join(ENGINES))
    max_upload_bytes: int


class ModelCard(BaseModel):
    model_id: str
    engine: str = Field(description="what computes the probabilities: " + ", ".join(ENGINES))
    arch: str
    backbone: str
    weights: str
    classes: list[str]
    positive_class: str | None
    threshold: float | None
    threshold_source: str
    temperature: float
    input_size: int
    preprocessing: dict[str, Any]
    metrics: dict[str, Any] = Field(description="validation metrics from training")
    config: dict[str, Any]
    versions: dict[str, str]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "the body is not a readable multipart form"),
        (413, "the file is over the size limit"),
        (415, "not multipart/form-data, or the file's type is not " + ACCEPTED_TYPES),
        (422, "the file is not a decodable image, or a field is missing or invalid"))}


# --- helpers --------------------------------------------------------------------------
def model_id(predictor: Predictor | Checkpoint, run: str | Path | None = None) -> str:
    """The backbone and a short hash of the checkpoint file (of the weights and card without one)."""
    checkpoint = predictor if isinstance(predictor, Checkpoint) else predictor.checkpoint
    digest = hashlib.sha256()
    if run is not None:
        return f"{checkpoint.backbone}-{file_sha256(checkpoint_path(run))[:12]}"
    else:
        digest.update(repr(sorted(plain(checkpoint.card()).items())).encode())
        for name, tensor in sorted(checkpoint.state_dict.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{checkpoint.backbone}-{digest.hexdigest()[:12]}"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI guard: refuse a body past `limit` bytes from its Content-Length, or, when chunked, as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")  # the server has checked it is a number
        if length.isdigit() and int(length) > self.limit:
            return await _error(413, _too_large(self.limit - MULTIPART_SLACK))(scope, receive, send)
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            if started:
                raise
            await _error(413, _too_large(self.limit - MULTIPART_SLACK))(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"the file is over the upload limit of {limit / 2**20:.3g} MB"


class _Service:
    def __init__(self, predictor: BasePredictor, checkpoint: Checkpoint, identity: str, max_pixels: int,
                 engine: str = "torch", run: str | Path | None = None):
        self.predictor, self.model_id, self.max_pixels = predictor, identity, max_pixels
        self.checkpoint, self.engine, self.run, self.model_lock = checkpoint, engine, run, threading.Lock()
        self.runner = BatchingRunner(predictor, self.model_lock)
        self.decode_slots = threading.BoundedSemaphore(decode_slots())
        self._explainer: Predictor | None = predictor if isinstance(predictor, Predictor) else None

    def explainer(self) -> Predictor:
        """The PyTorch network Grad-CAM hooks: the engine itself, or (ONNX engines) loaded on first use."""
        if self._explainer is None:
            self._explainer = load_predictor(self.run)
        return self._explainer

    def check_pixels(self, data: bytes, name: str) -> None:
        """Refuse absurd pixel counts from the header alone, before any pixel is decoded."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
        except Image.DecompressionBombError:  # over twice PIL's own bound
            size = None
        except Exception:  # not an image at all: decode says why, in the same words as predict
            return
        if size is None or size[0] * size[1] > self.max_pixels:
            raise HTTPException(422, f"{name}: too many pixels ({'%d x %d' % size if size else 'over 200 million'});"
                                     f" this server takes images of at most {self.max_pixels / 1e6:g} megapixels")

    def predict(self, data: bytes, name: str, explain: bool) -> dict:
        self.check_pixels(data, name)
        with self.decode_slots:
            try:
                array = self.predictor.decode(data)
            except UnreadableImage as error:
                raise HTTPException(422, f"{name}: {error}") from None
        row = self.predictor.row(name, self.runner.probabilities(array))
        result = {"file": name, "class": row["class"], "probabilities": row["probabilities"],
                  "threshold": row["threshold"], "threshold_source": self.threshold_source(),
                  "positive_class": self.checkpoint.positive_class, "model_id": self.model_id}
        if explain:
            result["heatmap_png_base64"] = base64.b64encode(self.explain(array)).decode("ascii")
        return result

    def explain(self, array: np.ndarray) -> bytes:
        try:
            from ..evaluation.explain import explanation_png
        except ImportError as error:
            raise HTTPException(501, f"explanations are not available here: {error}") from None
        with self.model_lock:  # Grad-CAM's hooks must not see another request's forward pass
            return explanation_png(self.explainer(), array)

    def threshold_source(self) -> str:
        """Where the engine's threshold came from: the int8 model has its own, chosen at export."""
        return self.predictor.threshold_source

    def card(self) -> dict:
        card = without_paths(plain(self.checkpoint.card()))
        return {**card, "model_id": self.model_id, "engine": self.engine, "threshold": self.predictor.threshold,
                "threshold_source": self.threshold_source(), "input_size": self.predictor.preprocessing.input_size}


async def _read_limited(file: UploadFile, limit: int) -> bytes:
    """The upload's bytes, read in chunks and refused as soon as they pass the limit."""
    chunks, size = [], 0
    while chunk := await file.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, _too_large(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(errors) -> str:
    def one(error) -> str:
        where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
        if where == "file":
            return ("missing form field 'file': send the image as multipart/form-data in a field named 'file'"
                    if error.get("type") == "missing" else "the form field 'file' must be a file upload, not text")
        return f"{where}: {error.get('msg', 'invalid')}"
    return "; ".join(one(error) for error in errors)


# --- the app --------------------------------------------------------------------------
def create_app(run_or_predictor: str | Path | Predictor, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               max_pixels: int = DEFAULT_MAX_PIXELS, engine: str = "auto") -> FastAPI:
    """A FastAPI app serving one trained run (a run folder, checkpoint file or loaded Predictor)
    on `engine` (config.ENGINES; a loaded Predictor is PyTorch's)."""
    if max_upload_bytes < 1 or max_pixels < 1:
        raise XferlearnError("the upload limit and the pixel limit must be positive.")
    if engine not in ENGINES:
        raise XferlearnError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}.")
    run = None
    if isinstance(run_or_predictor, Predictor):
        if engine not in ("auto", "torch"):
            raise XferlearnError("a loaded Predictor runs on PyTorch; serve the run folder to use an ONNX engine.")
        predictor, checkpoint, identity = run_or_predictor, run_or_predictor.checkpoint, model_id(run_or_predictor)
        engine = "torch"
    elif resolve_engine(run_or_predictor, engine) == "torch":
        run, engine = run_or_predictor, "torch"
        predictor = load_predictor(run)
        checkpoint, identity = predictor.checkpoint, model_id(predictor, run)
    else:
        from .predict import load_engine  # ONNX Runtime (and scikit-learn to quantise) only where asked

        run = run_or_predictor
        # `auto` as asked: where the export it wants cannot be written, load_engine keeps PyTorch.
        predictor, checkpoint = load_engine(run, engine), load_checkpoint(run)
        identity, engine = model_id(checkpoint, run), predictor.engine
    service = _Service(predictor, checkpoint, identity, max_pixels, engine, run)

    app = FastAPI(title="xferlearn", version=__version__,
                  description=f"Image classification with {identity} ({', '.join(predictor.classes)}).")
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + MULTIPART_SLACK)
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc.__cause__, _BodyTooLarge):  # raised while FastAPI parsed the form
            return _error(413, _too_large(max_upload_bytes))
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body is not a readable multipart/form-data form"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and not content_type.lower().startswith("multipart/form-data"):
            got = f"Content-Type {content_type}" if content_type else "no Content-Type header"
            return _error(415, f"send the image as multipart/form-data in a field named 'file' (got {got})")
        return _error(422, _validation_message(exc.errors()))

    @app.exception_handler(XferlearnError)
    async def user_error(request: Request, exc: XferlearnError):
        return _error(422, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.post("/predict", response_model=Prediction, response_model_exclude_unset=True,
              responses=ERROR_RESPONSES, summary="Classify one uploaded image")
    async def predict(request: Request, file: UploadFile = File(description="the image (JPEG, PNG, ...)"),
                      explain: bool = Query(False, description="add a Grad-CAM heatmap PNG (slower)")):
        media_type = (file.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if not (media_type.startswith("image/") or media_type == "application/octet-stream"):
            raise HTTPException(415, f"{file.filename}: the file's type is {media_type}, "
                                     f"not {ACCEPTED_TYPES}")
        files = (await request.form()).getlist("file")  # parsed once already: FastAPI's own form
        if len(files) > 1:  # one image per request; a silent pick of the last would answer the wrong one
            raise HTTPException(422, f"send one image per request in the field 'file' (got {len(files)})")
        data = await _read_limited(file, max_upload_bytes)
        return await run_in_threadpool(service.predict, data, file.filename or "upload", explain)

    @app.get("/health", response_model=Health, summary="Liveness and the model being served")
    def health():
        return {"status": "ok", "model_id": service.model_id, "engine": service.engine,
                "max_upload_bytes": max_upload_bytes}

    @app.get("/model", response_model=ModelCard, summary="The model card: classes, threshold, metrics")
    def model_card():
        return service.card()

    @app.get("/", include_in_schema=False)
    def upload_page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _listen(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so that a taken port is one clear line, not a traceback."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as error:  # taken, not ours to take, or not a port number
        raise XferlearnError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error} "
                             "(is another server using it? choose another --port).") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD, engine: str = "auto") -> None:
    """Serve a run over HTTP until interrupted."""
    import uvicorn

    app = create_app(run, max_upload_bytes, engine=engine)
    service, sock = app.state.service, _listen(host, port)
    why = why_not_int8(run, service.checkpoint) if engine == "auto" else ""  # auto did not find int8, the fastest on a CPU: why
    print(f"xferlearn: serving {service.model_id} on {service.engine}{f' ({why})' if why else ''} at {_url(sock)}/ "
          "(upload page at /, API docs at /docs); Ctrl+C stops.", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run `app` with uvicorn in a background thread (a free port by default); yields its base URL."""
    import uvicorn

    sock = _listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="xferlearn-serve")
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise XferlearnError(f"the server on {_url(sock)} stopped while starting; see its log.")
            time.sleep(0.02)
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
