"""A local web page and JSON REST endpoint for one model (FastAPI, served by uvicorn).

Endpoints: ``GET /`` (the page), ``GET /static/*`` (its script and style, shipped in the package),
``GET /healthz``, ``GET /api/model`` (the model card: the model file's metadata and its SHA-256),
``POST /api/predict`` (multipart field ``file``; ``explain=true`` as a form field or query parameter
adds Grad-CAM overlays as base64 PNGs).

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

Concurrency: requests run in the thread pool. Prediction only reads the shared model (under
``torch.inference_mode``), so it needs no lock for correctness; a semaphore of
``inference_slots`` (default 1) admits the CPU-heavy part — pre-processing and the forward pass —
because each forward already spreads over every core through torch's (or onnxruntime's) own
threads: two at once on the same cores oversubscribe them, and OpenMP thread teams that lose
their core stall for whole time slices (on a busy 2-core machine a 230 ms forward took 1–2.6 s). Image
decoding, upload checks and overlay drawing stay outside it. Grad-CAM hooks are state on a module, so
explanations use their own copy of the model, one request at a time behind a lock; predictions
never wait for an explanation.
"""

from __future__ import annotations

import base64
import copy
import io
import os
import socket
import struct
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from breastvision.data import dicom
from breastvision.data.io import IMAGE_FORMATS, load_image
from breastvision.errors import BreastvisionError
from breastvision.serving.predict import Predictor, load_predictor

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: 40 megapixels: ten times a 2048×2048 scan; BreakHis (700×460) and BUSI (~500×500) are far below.
DEFAULT_MAX_PIXELS = 40_000_000
#: Pillow format names an upload may have: the allow-list every command uses; Pillow's rarer decoders
#: are not exposed to uploads.
ACCEPTED_FORMATS = IMAGE_FORMATS
#: Longest side of the overlays returned to the browser; full-size PNGs of big scans are megabytes.
OVERLAY_MAX_SIDE = 1024

#: What Pillow raises on a damaged header (as in ``data.io``); anything else is a bug and should surface.
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

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


def _png_base64(image: Image.Image) -> str:
    image = image.copy()
    image.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class InferenceService:
    """The model and the rules for using it from many request threads at once."""

    def __init__(
        self, predictor: Predictor, *, max_pixels: int = DEFAULT_MAX_PIXELS, inference_slots: int = 1,
        tta: bool = False,
    ) -> None:
        self.predictor = predictor
        self.max_pixels = max_pixels
        self.tta = tta
        self.card = predictor.card()
        self._slots = threading.BoundedSemaphore(inference_slots)
        self._explain_lock = threading.Lock()
        self._explainer: Any = None

    def decode(self, data: bytes, frame: int = 1) -> tuple[Image.Image, dict[str, Any]]:
        """The upload as an RGB image and facts for the answer (format, and a DICOM's frame), or an
        ``UploadError`` (see module docstring)."""
        if not data:
            raise UploadError(400, "the uploaded file is empty")
        if data[128:132] == b"DICM":
            return self._decode_dicom(data, frame)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as header:
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
        with _upload_file(data, "upload") as path:
            return load_image(path), {"format": image_format}

    def _decode_dicom(self, data: bytes, frame: int) -> tuple[Image.Image, dict[str, Any]]:
        with _upload_file(data, "upload.dcm") as path:
            info = dicom.read_info(path)
            self._check_size(*info.stored_size)
            image = load_image(dicom.frame_path(path, frame) if info.frames > 1 or frame != 1 else path)
        facts = {"format": "DICOM", "frames": info.frames, "frame": frame, "spacing_mm": info.spacing_mm}
        return image, {**facts, "preview": _png_base64(image)}

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            size = f"{width}×{height} = {width * height:,} pixels"
            raise UploadError(413, f"image is {size}, over the limit of {self.max_pixels:,}")

    def predict(self, data: bytes, explain: bool = False, frame: int = 1) -> dict[str, Any]:
        started = time.perf_counter()
        if explain and not self.predictor.can_explain:
            raise UploadError(400, "explanations need the .safetensors model file, not an ONNX export")
        image, facts = self.decode(data, frame)
        with self._slots:
            try:
                tensor = self.predictor.preprocess(image)
            except BreastvisionError as err:
                raise UploadError(400, str(err)) from None
            probs = self.predictor.probabilities(tensor.unsqueeze(0), tta=self.tta)[0]
        names = self.predictor.class_names
        best = int(np.argmax(probs))
        result: dict[str, Any] = {
            "predicted_class": names[best],
            "predicted_index": best,
            "probabilities": {name: float(p) for name, p in zip(names, probs, strict=True)},
            "class_names": names,
            "tta": self.tta,
            "image": {"width": image.width, "height": image.height, **facts},
        }
        if explain:
            result["explanation"] = self._explain(image, tensor, best)
        result["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return result

    def _explain(self, image: Image.Image, tensor: Any, target: int) -> dict[str, Any]:
        from breastvision.explanation.gradcam import explain, overlay

        with self._explain_lock:
            if self._explainer is None:
                self._explainer = copy.deepcopy(self.predictor.model)
            explanation = explain(self._explainer, tensor, architecture=self.predictor.info.architecture,
                                  target=target)
        overlays = {
            name: _png_base64(overlay(image, heatmap, self.predictor.preprocessing))
            for name, heatmap in explanation.heatmaps.items()
        }
        return {
            "method": explanation.method,
            "target_class": self.predictor.class_names[explanation.target],
            "layers": explanation.layers,
            "overlay": next(iter(overlays.values())),
            "overlays": overlays,
        }


def create_app(
    model: str | os.PathLike | Predictor,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    inference_slots: int = 1,
    tta: bool = False,
) -> FastAPI:
    """The web application for a model file, an ONNX export, or an already loaded predictor."""
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    service = InferenceService(predictor, max_pixels=max_pixels, inference_slots=inference_slots, tta=tta)
    app = FastAPI(
        title="breastvision", docs_url=None, redoc_url=None,
        description="Class probabilities and Grad-CAM heat-maps for one breast-cancer image classifier.",
    )
    app.state.service = service
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
        data = await file.read()
        try:
            result = await run_in_threadpool(service.predict, data, explain or explain_query,
                                             frame or frame_query or 1)
        except UploadError as err:
            return JSONResponse({"detail": err.message}, status_code=err.status)
        return JSONResponse(result)

    return app


def serve(
    model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, **options: Any
) -> None:
    """Start uvicorn on ``host:port`` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, **options), host=host, port=port, log_level="info")


@contextmanager
def _upload_file(data: bytes, name: str) -> Iterator[Path]:
    """The upload as a private temporary file (``data.io`` reads paths: one loader for CLI and web);
    a ``BreastvisionError`` inside becomes a 400 that does not name the temporary path."""
    with tempfile.TemporaryDirectory(prefix="breastvision-upload-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            yield path
        except BreastvisionError as err:
            raise UploadError(400, str(err).removeprefix(f"{path}: ")) from None


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free port; yields its base URL, stops on exit.

    For tests and benchmarks: the socket is bound here (port 0), so there is no race for a port.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise BreastvisionError("the web server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
