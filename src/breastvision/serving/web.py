"""A local web page and JSON REST endpoint for one model (FastAPI, served by uvicorn).

Endpoints: ``GET /`` (the page), ``GET /static/*`` (its script and style, shipped in the package),
``GET /healthz``, ``GET /api/model`` (the model card: the model file's metadata and its SHA-256),
``POST /api/predict`` (multipart field ``file``; ``explain=true`` as a form field or query parameter
adds Grad-CAM overlays as base64 PNGs). An answer carries the predictor's ``Judge`` output:
``predicted_class`` (the most probable), ``decision`` and ``decision_rule`` (the call at the operating
point the app was created with, ``serve --operating-point``, else the most probable class: the page's
headline), ``decisions`` at every stored operating point and the scope flag.

Nothing is loaded from elsewhere: FastAPI's Swagger and ReDoc pages (which fetch their scripts from
a CDN) are switched off, and a Content-Security-Policy of ``'self'`` makes the browser refuse any
other origin should a later edit add one.

Uploads are judged by content, never by their name or declared type:

- the request body is capped (``max_upload_bytes``) → 413, from the declared Content-Length before
  anything is read, else while a chunked body streams in (FastAPI's own ``max_body_size`` answers
  the first case in plain text, not JSON, hence :class:`UploadLimit`);
- Pillow must recognise one of :data:`ACCEPTED_FORMATS` from the magic bytes, or the body must be a
  DICOM Part 10 file (``DICM`` at byte 128) → otherwise 415;
- the header's pixel count must not exceed ``max_pixels`` (checked before any pixel is decoded, so
  a small compressed file that would inflate to gigabytes is refused) → 413; Pillow's own bomb
  limit (``Image.MAX_IMAGE_PIXELS``, 89 MP) caps it whatever ``max_pixels`` says;
- the file is then decoded by ``data.io.load_image``, the loader every other command uses, which
  also rejects truncated data and tiny images → 400.

A DICOM upload is checked by ``data.dicom`` (no pixel data, an unknown transfer syntax → 400); for a
multi-frame file ``frame`` (form field or query parameter, from 1; default 1) picks the frame. Its
answer carries the frame, the frame count, the pixel spacing (mm, when the file says) and a PNG
preview (browsers cannot show DICOM), and never an attribute of the file beyond the image's own (no
patient, institution or UID).

Memory: an upload is never held in memory whole. FastAPI spools the body to a temporary file; it is
copied, in chunks, to the private file ``data.io`` reads. The header is read first (size limits
above), then ``data.io.decode_bytes`` estimates what decoding will hold at its peak and the decode
and pre-processing wait in a :class:`~breastvision.serving.concurrency.MemoryBudget` of
``memory_budget_bytes`` until that fits. Decoding is reduced (``load_image(at_least=...)``: JPEG's
DCT scaling, box reduction by whole factors otherwise) to no less than :data:`EXACT_DECODE_SIDE`
pixels, or twice the model's first resize if that is more, on each side. The factors are whole, so
a side under twice that is never reduced: every BreakHis and BUSI image and an ordinary ultrasound
export is decoded exactly as ``predict`` decodes it, and the page and the CLI give the same
probabilities; a 6300×6300 scan is reduced 6-fold on each side before anything else is made of it.
glibc would keep the freed buffers of big images in its per-thread heaps (its mmap threshold grows
to the largest buffer freed, so later ones come from the heaps, which it trims only from the top),
so a decode of :data:`_TRIM_AFTER_BYTES` or more ends with ``malloc_trim``, which hands every free
page back. (Fixing the threshold low with ``mallopt`` instead made every large tensor of a forward
pass a fresh mapping: a third more CPU per request.)

Inference: ``inference_workers`` threads run the forward passes, on micro-batches of concurrent
requests (:class:`~breastvision.serving.concurrency.MicroBatcher`: what is waiting when a worker
comes free, topped up for ``batch_wait_s``, at most ``max_batch``). :func:`serve` gives each worker
its share of the cores as torch's (and onnxruntime's) intra-op threads — by default one worker per
core, each single-threaded: a thread team spread over several cores stalls at every barrier when
another process takes one of them for a time slice (on a busy 2-core machine a 230 ms forward took
1–2.6 s, and spinning threads burnt four times the CPU), while single-threaded workers lose only
their own slice. Batching does not change results (each image's probabilities equal its
single-image ones within float rounding). ``backend="onnxruntime"`` with a
``.safetensors`` file exports it to ONNX once on start (``serving.export``, in a child process) and
predicts with onnxruntime; the PyTorch model is loaded again only for Grad-CAM, on the first
explanation. Grad-CAM hooks are state on a module, so explanations use a model of their own, one
request at a time behind a lock; predictions never wait for an explanation.

Slow clients: a request whose headers are not complete ``header_timeout_s`` after the connection
opened (or after the previous response) gets 408 and is closed (an h11 protocol subclass, since
uvicorn has no header timeout); a body not complete ``body_timeout_s`` after the headers gets a JSON
408 (:class:`BodyDeadline`); idle keep-alive connections close after ``keep_alive_s``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import ctypes
import io
import logging
import multiprocessing
import os
import shutil
import struct
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import IO, Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from breastvision.data import dicom
from breastvision.data.io import IMAGE_FORMATS, decode_bytes, load_image
from breastvision.errors import BreastvisionError
from breastvision.serving.concurrency import MemoryBudget, MicroBatcher
from breastvision.serving.predict import OnnxPredictor, Predictor, TorchPredictor, load_predictor

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: 40 megapixels: ten times a 2048×2048 scan; BreakHis (700×460) and BUSI (~500×500) are far below.
DEFAULT_MAX_PIXELS = 40_000_000
#: Pixel buffers of decodes in progress: one 6300×6300 RGB scan (about 170 MB) at a time, or
#: dozens of BUSI-sized images.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT_S = 0.005
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Long enough for the largest upload at about 3 Mbit/s.
DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_KEEP_ALIVE_S = 5
BACKENDS = ("auto", "pytorch", "onnxruntime")
#: Pillow format names an upload may have: the allow-list every command uses; Pillow's rarer decoders
#: are not exposed to uploads.
ACCEPTED_FORMATS = IMAGE_FORMATS
#: Longest side of the overlays returned to the browser; full-size PNGs of big scans are megabytes.
OVERLAY_MAX_SIDE = 1024
#: Decodes estimated to hold this much give the freed memory back to the system when done.
_TRIM_AFTER_BYTES = 32 * 1024 * 1024

#: What Pillow raises on a damaged header (as in ``data.io``); anything else is a bug and should surface.
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

log = logging.getLogger(__name__)

STATIC_DIR = Path(str(files("breastvision.serving") / "static"))
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class UploadError(Exception):
    """An upload the server refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UploadLimit:
    """ASGI middleware refusing request bodies over ``limit`` bytes with a JSON 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _message(self, size: int) -> str:
        return f"upload of {size:,} bytes is over the limit of {self.limit:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            refusal = JSONResponse({"detail": self._message(int(declared))}, status_code=413)
            await refusal(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # An HTTPException passes through FastAPI's body parsing and becomes a JSON reply.
                raise HTTPException(413, self._message(received))
            return message

        await self.app(scope, limited_receive, send)


class BodyDeadline:
    """ASGI middleware answering a JSON 408 when a request body is not complete ``seconds`` after
    its headers: one deadline for the whole body, so a client trickling a byte at a time is cut off too."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.seconds
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:  # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                reason = f"the request body did not arrive within {self.seconds:g} s"
                raise HTTPException(408, reason) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    ``seconds`` after it opened or after its previous response (uvicorn itself waits forever)."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._headers_overdue)

        def _headers_overdue(self) -> None:
            # A request in progress had its headers in time; its body is BodyDeadline's business.
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.write(_REQUEST_TIMEOUT)
                self.transport.close()

    return HeaderTimeoutH11Protocol


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the C heaps' free pages back to the system (glibc only; see the module docstring)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _png_base64(image: Image.Image) -> str:
    image = image.copy()
    image.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Prepared:
    """An upload ready for the model: its pre-processed tensor, facts for the answer (size, format,
    a DICOM's frame), and the (possibly reduced) RGB image if overlays will be drawn on it."""

    tensor: torch.Tensor
    facts: dict[str, Any]
    image: Image.Image | None = None


@contextmanager
def _upload_file(upload: IO[bytes]) -> Iterator[Path]:
    """The upload copied in chunks to a private temporary file (``data.io`` reads paths: one loader
    for CLI and web), named ``.dcm`` if it is DICOM; a ``BreastvisionError`` inside becomes a 400
    that does not name the temporary path."""
    with tempfile.TemporaryDirectory(prefix="breastvision-upload-") as tmp:
        path = Path(tmp) / "upload"
        with path.open("wb") as out:
            shutil.copyfileobj(upload, out)
        if dicom.is_dicom(path):
            path = path.rename(path.with_suffix(".dcm"))
        try:
            yield path
        except BreastvisionError as err:
            raise UploadError(400, str(err).removeprefix(f"{path}: ")) from None


#: Reduced decoding keeps at least this many pixels a side (a side under twice it is decoded in full).
EXACT_DECODE_SIDE = 1024


class InferenceService:
    """The model and the rules for using it from many request threads at once.

    Grad-CAM needs PyTorch: a ``TorchPredictor`` explains with a copy of its own model; an ONNX
    export explains only if ``explain_file`` names its model file, loaded on the first explanation
    (a server that is never asked for one never holds both models).
    """

    def __init__(
        self, predictor: Predictor, *, explain_file: Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS, tta: bool | str | None = False,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, max_batch: int = DEFAULT_MAX_BATCH,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S, inference_workers: int = 1,
    ) -> None:
        self.predictor = predictor
        self.explain_file = explain_file
        self.can_explain = predictor.can_explain or explain_file is not None
        self.max_pixels = max_pixels
        #: The view set every answer averages (``None``: none), named in each answer.
        self.tta = predictor.resolve_tta(tta)
        self.card = predictor.card()
        self.card["source"]["explainable"] = self.can_explain
        first_size = predictor.preprocessing.resize or predictor.preprocessing.input_size
        side = max(EXACT_DECODE_SIDE, 2 * first_size)  # reduced decoding only above (module docstring)
        self.decode_at_least = (side, side)
        self.budget = MemoryBudget(memory_budget_bytes)
        self.batcher: MicroBatcher[torch.Tensor, tuple[np.ndarray, float | None]] = MicroBatcher(
            self._forward, max_batch=max_batch, max_wait_s=batch_wait_s, workers=inference_workers,
            name="breastvision-inference",
        )
        self._explain_lock = threading.Lock()
        self._explain_model: Any = None

    def close(self) -> None:
        self.batcher.close()

    def _forward(self, tensors: list[torch.Tensor]) -> list[tuple[np.ndarray, float | None]]:
        probs, scores, _ = self.predictor.assess(torch.stack(tensors), tta=self.tta)
        return [(row, None if scores is None else float(scores[i])) for i, row in enumerate(probs)]

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            size = f"{width}×{height} = {width * height:,} pixels"
            raise UploadError(413, f"image is {size}, over the limit of {self.max_pixels:,}")

    def check_header(self, path: Path) -> tuple[int, int, str]:
        """Width, height and format of the upload, or an ``UploadError`` (see module docstring)."""
        if path.stat().st_size == 0:
            raise UploadError(400, "the uploaded file is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path, formats=ACCEPTED_FORMATS) as header:
                    width, height, image_format = header.width, header.height, header.format
        except UnidentifiedImageError:
            raise UploadError(
                415, f"not an image: the content is none of {', '.join(ACCEPTED_FORMATS)} or DICOM"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(413, "image refused as a possible decompression bomb") from None
        except _HEADER_ERRORS as err:
            raise UploadError(400, f"unreadable image header ({err})") from None
        self._check_size(width, height)
        return width, height, image_format

    def prepare(self, upload: IO[bytes], keep_image: bool = False, frame: int = 1) -> Prepared:
        """Decode and pre-process an upload within the memory budget; ``keep_image`` keeps the
        (possibly reduced) RGB image, which only explanations need."""
        with _upload_file(upload) as path:
            if path.suffix == ".dcm":
                return self._prepare_dicom(path, frame, keep_image)
            width, height, image_format = self.check_header(path)
            cost = decode_bytes(path, at_least=self.decode_at_least)
            with self.budget.reserve(cost):
                image = load_image(path, at_least=self.decode_at_least)
                tensor = self.predictor.preprocess(image)
        if cost >= _TRIM_AFTER_BYTES:
            release_freed_memory()
        # Without overlays to draw, the decoded pixels go now, not when the response has been sent.
        facts = {"width": width, "height": height, "format": image_format}
        return Prepared(tensor, facts, image if keep_image else None)

    def _prepare_dicom(self, path: Path, frame: int, keep_image: bool) -> Prepared:
        info = dicom.read_info(path)
        self._check_size(*info.stored_size)
        with self.budget.reserve(decode_bytes(path)):  # DICOM is decoded whole
            image = load_image(dicom.frame_path(path, frame) if info.frames > 1 or frame != 1 else path)
            tensor = self.predictor.preprocess(image)
        facts = {"width": image.width, "height": image.height, "format": "DICOM", "frames": info.frames,
                 "frame": frame, "spacing_mm": info.spacing_mm, "preview": _png_base64(image)}
        return Prepared(tensor, facts, image if keep_image else None)

    def predict(self, upload: IO[bytes], explain: bool = False, frame: int = 1) -> dict[str, Any]:
        started = time.perf_counter()
        if explain and not self.can_explain:
            raise UploadError(400, "explanations need the .safetensors model file, not an ONNX export")
        prepared = self.prepare(upload, keep_image=explain, frame=frame)
        probs, scope_score = self.batcher.submit(prepared.tensor).result()
        judge = self.predictor.judge
        prediction = judge("upload", Path("upload"), probs, scope_score)
        names = self.predictor.class_names
        best = names.index(prediction.predicted)
        result: dict[str, Any] = {
            "predicted_class": prediction.predicted,
            "predicted_index": best,
            # What the page headlines: the predicted class, or the call at the chosen operating point.
            "decision": prediction.decision,
            "decision_rule": judge.rule,
            "probabilities": prediction.probabilities,
            "class_names": names,
            "tta": self.tta,
            "image": prepared.facts,
        }
        if prediction.decisions:
            result["decisions"] = prediction.decisions  # at the model file's operating points
        if prediction.scope_score is not None:  # models.scope: far from the training images
            result["scope_score"] = prediction.scope_score
            result["out_of_scope"] = prediction.out_of_scope
        if explain:
            result["explanation"] = self._explain(prepared, best)
        result["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return result

    def _explain(self, prepared: Prepared, target: int) -> dict[str, Any]:
        from breastvision.explanation.gradcam import explain, overlay

        with self._explain_lock:
            if self._explain_model is None:
                if isinstance(self.predictor, TorchPredictor):
                    # Predictions share the predictor's model; Grad-CAM's hooks need one of their own.
                    self._explain_model = copy.deepcopy(self.predictor.model)
                else:
                    self._explain_model = load_predictor(self.explain_file).model
            explanation = explain(self._explain_model, prepared.tensor,
                                  architecture=self.predictor.info.architecture, target=target)
        overlays = {
            name: _png_base64(overlay(prepared.image, heatmap, self.predictor.preprocessing))
            for name, heatmap in explanation.heatmaps.items()
        }
        return {
            "method": explanation.method,
            "target_class": self.predictor.class_names[explanation.target],
            "layers": explanation.layers,
            "overlay": next(iter(overlays.values())),
            "overlays": overlays,
        }


def _predictor(model: str | os.PathLike | Predictor, backend: str | None, device: str = "cpu",
               operating_point: str | None = None) -> tuple[Predictor, Path | None]:
    """The predictor running forward passes on ``backend``, and the model file an ONNX export of it
    explains with. None: the file's own back-end; "auto": onnxruntime for a model file, exported on
    start (with its scope, if it has one: the graph computes the out-of-scope score), unless the
    export fails (then PyTorch, with a warning) or the model is on a GPU."""
    if backend not in (None, *BACKENDS):
        raise BreastvisionError(f"unknown back-end '{backend}' (choose from {', '.join(BACKENDS)})")
    loaded = model if isinstance(model, Predictor) else load_predictor(model, device)
    loaded.use_operating_point(operating_point)  # an unknown name fails before any export
    if backend is None or backend == loaded.backend or (backend == "auto" and loaded.backend != "pytorch"):
        return loaded, None
    if backend == "auto" and isinstance(loaded, TorchPredictor) and loaded.device.type == "cuda":
        return loaded, None
    if not isinstance(loaded, TorchPredictor):
        raise BreastvisionError("an ONNX file runs on onnxruntime only: serve the .safetensors model file")
    try:
        with tempfile.TemporaryDirectory(prefix="breastvision-serve-") as tmp:
            exported = _export_in_subprocess(loaded.source, Path(tmp) / "model.onnx")
            onnx_predictor = OnnxPredictor(exported, loaded.device).use_operating_point(operating_point)
    except Exception as err:  # noqa: BLE001 - any exporter failure: PyTorch still serves, or a clear error
        if backend != "auto":
            raise BreastvisionError(f"the ONNX export of {loaded.source.name} failed: {err}") from err
        log.warning("serving %s on PyTorch: its ONNX export failed (%s)", loaded.source.name, err)
        return loaded, None
    # onnxruntime read the whole file into the session; the card names the file that was served.
    # The PyTorch model is dropped here and loaded again only if an explanation is asked for.
    onnx_predictor.source = loaded.source
    return onnx_predictor, loaded.source


def _export_in_subprocess(model_file: Path, out: Path) -> Path:
    """``serving.export.export_onnx`` in a fresh process: the exporter's tracing leaves hundreds of
    megabytes behind that a long-running server would otherwise hold."""
    from breastvision.serving.export import export_onnx

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(export_onnx, model_file, out).result().path


def create_app(
    model: str | os.PathLike | Predictor,
    *,
    backend: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    tta: bool | str | None = False,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
    inference_workers: int = 1,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    device: str = "cpu",
    operating_point: str | None = None,
) -> FastAPI:
    """The web application for a model file, an ONNX export, or an already loaded predictor.

    ``backend``: None keeps the file's own back-end; "onnxruntime" runs a model file's forward
    passes on onnxruntime by exporting it on start; "auto" does so unless the export fails.
    ``device``: where a model given by path runs (``devices.resolve_device``). ``operating_point``:
    the stored operating point the answer's ``decision`` (the page's headline) follows (``None``: the
    most probable class); an unknown name is a one-line error listing the stored ones. ``tta``
    (``serving.predict.TtaChoice``: ``True`` the model file's own view set, or a set's name): every
    answer averages that set and names it (``tta``; ``null``: none); the card's ``tta`` gives the
    model's own set.
    """
    predictor, explain_file = _predictor(model, backend, device, operating_point)
    service = InferenceService(
        predictor, explain_file=explain_file, max_pixels=max_pixels, tta=tta,
        memory_budget_bytes=memory_budget_bytes, max_batch=max_batch, batch_wait_s=batch_wait_s,
        inference_workers=inference_workers,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        service.close()

    app = FastAPI(
        title="breastvision", docs_url=None, redoc_url=None, lifespan=lifespan,
        description="Class probabilities and Grad-CAM heat-maps for one breast-cancer image classifier.",
    )
    app.state.service = service
    _add_middleware(app, max_upload_bytes, body_timeout_s)
    _add_routes(app, service)
    return app


def _add_middleware(app: FastAPI, max_upload_bytes: int, body_timeout_s: float) -> None:
    app.add_middleware(BodyDeadline, seconds=body_timeout_s)
    app.add_middleware(UploadLimit, limit=max_upload_bytes)

    # Added last, so outermost: every answer carries the headers, the upload limit's 413 too.
    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _add_routes(app: FastAPI, service: InferenceService) -> None:
    predictor = service.predictor
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "architecture": predictor.info.architecture, "backend": predictor.backend}

    @app.get("/api/model")
    def model_card() -> dict[str, Any]:
        return service.card

    @app.post("/api/predict")
    async def api_predict(
        file: Annotated[UploadFile | None, File(description="the image, judged by content")] = None,
        explain: Annotated[bool, Form(description="add Grad-CAM overlays (base64 PNG)")] = False,
        explain_query: Annotated[bool, Query(alias="explain", description="same as the form field")] = False,
        frame: Annotated[int | None, Form(ge=1, description="frame of a multi-frame DICOM, from 1")] = None,
        frame_query: Annotated[
            int | None, Query(alias="frame", ge=1, description="same as the form field")
        ] = None,
    ) -> JSONResponse:
        if file is None:
            return JSONResponse({"detail": "no image: send it as multipart field 'file'"}, status_code=400)
        try:
            result = await run_in_threadpool(service.predict, file.file, explain or explain_query,
                                             frame or frame_query or 1)
        except UploadError as err:
            return JSONResponse({"detail": err.message}, status_code=err.status)
        return JSONResponse(result)


def _uvicorn_config(app: FastAPI, header_timeout_s: float, keep_alive_s: int, **options: Any) -> Any:
    import uvicorn

    return uvicorn.Config(
        app, http=header_timeout_protocol(header_timeout_s), timeout_keep_alive=keep_alive_s, **options
    )


def serve(
    model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
    inference_workers: int | None = None, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    keep_alive_s: int = DEFAULT_KEEP_ALIVE_S, **options: Any,
) -> None:
    """Start uvicorn on ``host:port`` until interrupted; ``options`` go to :func:`create_app`.

    The process's cores are shared out between ``inference_workers`` (None: one per core) as
    intra-op threads (see the module docstring).
    """
    import uvicorn

    cores = len(os.sched_getaffinity(0))
    workers = inference_workers or cores
    torch.set_num_threads(max(1, cores // workers))  # before onnxruntime sessions are made: they follow it
    app = create_app(model, inference_workers=workers, **options)
    config = _uvicorn_config(app, header_timeout_s, keep_alive_s, host=host, port=port, log_level="info")
    uvicorn.Server(config).run()
