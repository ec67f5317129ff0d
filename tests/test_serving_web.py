"""The web page and REST API: model card, predictions, explanations, upload checks, concurrency,
micro-batching, the decoding memory budget, slow-client timeouts and the back-ends."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import socket
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from breastvision.data.io import decode_bytes
from breastvision.errors import BreastvisionError
from breastvision.serving import web
from breastvision.serving.concurrency import MemoryBudget, MicroBatcher
from breastvision.serving.export import export_onnx
from breastvision.serving.predict import load_predictor
from breastvision.serving.web import STATIC_DIR, InferenceService, create_app
from webserver import background_server

MAX_UPLOAD = 200_000
MAX_PIXELS = 300 * 300


def _png(size: tuple[int, int] = (90, 70), seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _flat_png(size: tuple[int, int]) -> bytes:
    """A PNG of one grey level: many pixels, few bytes."""
    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width``×``height``: a decompression bomb's calling card."""
    data = _png((32, 32))
    ihdr = bytearray(data[16:29])  # after the signature, the IHDR chunk's length and type
    struct.pack_into(">II", ihdr, 0, width, height)
    return data[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


@pytest.fixture(scope="module")
def model_file(make_model_file) -> Path:
    return make_model_file("resnet18", input_size=64, resize=72)


@pytest.fixture(scope="module")
def client(model_file: Path):
    app = create_app(model_file, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
    with TestClient(app) as test_client:
        yield test_client


def _upload(client, data: bytes, name: str = "scan.png", kind: str = "image/png", **form):
    return client.post("/api/predict", files={"file": (name, data, kind)}, data=form)


def test_health_and_model_card(client, model_file: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "architecture": "resnet18", "backend": "pytorch"}
    card = client.get("/api/model").json()
    assert card["class_names"] == ["benign", "malignant", "normal"]
    assert card["preprocessing"]["resize"] == 72
    assert card["lineage"][0]["stage"] == "random init" and card["metrics"]["val"]["accuracy"] == 0.5
    assert card["source"]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()


def test_page_is_self_contained(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/[^"]*)"', page.text)
    assert re.findall(r'(?:src|href)="([^"]+)"', page.text).count("data:,") == 1  # the empty favicon
    assert sorted(assets) == ["/static/app.js", "/static/style.css"]
    for asset in assets:
        assert client.get(asset).status_code == 200
    for path in STATIC_DIR.iterdir():
        assert not re.search(r"https?://|//cdn", path.read_text()), path.name
    # FastAPI's own docs pages would pull their scripts from a CDN: they are off.
    assert client.get("/docs").status_code == 404


def test_predict_matches_the_predictor(client, model_file: Path, tmp_path: Path) -> None:
    data = _png(seed=1)
    response = _upload(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    (tmp_path / "x.png").write_bytes(data)
    predictor = load_predictor(model_file)
    from breastvision.data.io import load_image

    expected = predictor.probabilities(predictor.preprocess(load_image(tmp_path / "x.png"))[None])[0]
    got = np.array([body["probabilities"][c] for c in body["class_names"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert body["predicted_class"] == body["class_names"][int(expected.argmax())]
    assert body["image"] == {"width": 90, "height": 70, "format": "PNG"}
    assert "explanation" not in body


@pytest.mark.parametrize("how", ["form", "query"])
def test_explain_returns_an_overlay_of_the_image(client, how: str) -> None:
    if how == "form":
        response = _upload(client, _png(seed=2), explain="true")
    else:
        files = {"file": ("s.png", _png(seed=2), "image/png")}
        response = client.post("/api/predict?explain=true", files=files)
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    assert explanation["layers"] == {"gradcam": ["layer4"]}
    assert explanation["target_class"] == response.json()["predicted_class"]
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay"])))
    assert overlay.format == "PNG" and overlay.size == (90, 70)


def test_content_decides_not_the_name_or_declared_type(client) -> None:
    assert _upload(client, _png(mode="L"), name="notes.txt", kind="text/plain").status_code == 200
    response = _upload(client, b"GIF89a? no, just text pretending", name="scan.png")
    assert response.status_code == 415 and "not an image" in response.json()["detail"]
    response = _upload(client, b"plain text\n" * 20, name="scan.png")
    assert response.status_code == 415


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (_png()[:300], 400, "truncated"),
        (b"", 400, "empty"),
        (_png((10, 10)), 400, "minimum side"),
        (_flat_png((400, 400)), 413, "over the limit of 90,000"),
        (_png_claiming(100_000, 100_000), 413, "decompression bomb"),
        (bytes(MAX_UPLOAD + 1), 413, "over the limit of 200,000 bytes"),
    ],
    ids=["truncated", "empty", "tiny", "too-many-pixels", "bomb-header", "too-large-body"],
)
def test_bad_uploads_get_clear_json_errors(client, data: bytes, status: int, message: str) -> None:
    response = _upload(client, data)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "TIFF"])
def test_damaged_files_never_cause_a_server_error(client, image_format: str) -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png((48, 40), seed=3))).save(buffer, format=image_format)
    original = buffer.getvalue()
    rng = np.random.default_rng(7)
    statuses = set()
    for _ in range(25):
        data = bytearray(original)
        for position in rng.integers(0, min(len(data), 200), size=3):  # the header region
            data[position] = int(rng.integers(0, 256))
        statuses.add(_upload(client, bytes(data)).status_code)
    assert statuses <= {200, 400, 413, 415}, statuses


def test_streamed_body_is_cut_off_at_the_limit(client) -> None:
    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(MAX_UPLOAD // 10_000 + 2):
            yield bytes(10_000)

    headers = {"content-type": "multipart/form-data; boundary=x"}
    response = client.post("/api/predict", content=chunks(), headers=headers)
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]


def test_missing_file_field(client) -> None:
    response = client.post("/api/predict", data={"explain": "true"})
    assert response.status_code == 400 and "multipart field 'file'" in response.json()["detail"]


def test_a_calibrated_model_file_serves_its_probabilities_and_decisions(model_file: Path, tmp_path: Path):
    from breastvision.models.bundle import ModelBundle

    bundle = ModelBundle.load(model_file)
    bundle.calibration = {"temperature": 3.0}
    bundle.operating_points = {"positive_class": "malignant", "target_sensitivity": 0.95,
                               "thresholds": {"youden": 0.0}}
    calibrated = bundle.save(tmp_path / "calibrated.safetensors")
    (tmp_path / "x.png").write_bytes(_png(seed=2))
    predictor = load_predictor(calibrated)
    with TestClient(create_app(calibrated)) as calibrated_client:
        body = _upload(calibrated_client, _png(seed=2)).json()
    from breastvision.data.io import load_image

    expected = predictor.probabilities(predictor.preprocess(load_image(tmp_path / "x.png"))[None])[0]
    np.testing.assert_allclose([body["probabilities"][c] for c in body["class_names"]], expected, atol=1e-6)
    assert body["decisions"] == {"youden": True}
    assert body["decision"] == body["predicted_class"] and body["decision_rule"] == "argmax"
    # serve --operating-point: the answer's decision (the page's headline) is the call at that point,
    # here threshold 0, so always the positive class, whatever the most probable one.
    with TestClient(create_app(calibrated, operating_point="youden")) as at_youden:
        chosen = _upload(at_youden, _png(seed=2)).json()
    assert (chosen["decision"], chosen["decision_rule"]) == ("malignant", "youden")
    assert chosen["predicted_class"] == body["predicted_class"]
    with pytest.raises(BreastvisionError, match=r"'f1' is unknown; the stored ones: youden$"):
        create_app(calibrated, operating_point="f1")


def test_onnx_model_serves_predictions_but_not_explanations(model_file: Path, tmp_path: Path) -> None:
    onnx_file = export_onnx(model_file, tmp_path / "m.onnx", opset=17, verify=False).path
    with TestClient(create_app(onnx_file)) as onnx_client:
        source = onnx_client.get("/api/model").json()["source"]
        assert source["backend"] == "onnxruntime" and source["explainable"] is False
        assert _upload(onnx_client, _png()).status_code == 200
        response = _upload(onnx_client, _png(), explain="true")
        assert response.status_code == 400 and "ONNX" in response.json()["detail"]


def test_concurrent_requests_do_not_interfere(model_file: Path) -> None:
    images = [_png(seed=s) for s in range(3)]
    app = create_app(model_file, inference_workers=2)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        def ask(i: int) -> tuple[int, dict]:
            explain = "true" if i % 3 == 0 else "false"
            files = {"file": ("s.png", images[i % 3], "image/png")}
            response = http.post("/api/predict", files=files, data={"explain": explain})
            return i, response.json() if response.status_code == 200 else {"status": response.status_code}

        alone = [ask(i)[1]["probabilities"] for i in range(3)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(ask, range(24)))
    for i, body in results:
        assert "probabilities" in body, body
        assert body["probabilities"] == pytest.approx(alone[i % 3], abs=1e-6)
        assert ("explanation" in body) == (i % 3 == 0)


def _smooth_png(size: tuple[int, int], seed: int = 0) -> bytes:
    """A photo-like image (smooth, every pixel different) of ``size``; compresses poorly, so keep it small."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    coarse.save(buffer, format="PNG")
    return buffer.getvalue()


def test_micro_batches_give_the_single_image_probabilities(model_file: Path) -> None:
    predictor = load_predictor(model_file)
    service = InferenceService(predictor, max_batch=4, batch_wait_s=0.5)
    try:
        tensors = [torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in range(6)]
        futures = [service.batcher.submit(t) for t in tensors]
        batched = [f.result(timeout=60) for f in futures]
    finally:
        service.close()
    # Submitted well within the wait: one full batch, then the rest together.
    assert service.batcher.batch_sizes == {4: 1, 2: 1}
    for tensor, (probs, scope_score) in zip(tensors, batched, strict=True):
        np.testing.assert_allclose(probs, predictor.probabilities(tensor[None])[0], atol=1e-5)
        assert scope_score is None  # the file has no scope


def test_a_failing_batch_fails_each_of_its_requests() -> None:
    def broken(items: list[int]) -> list[int]:
        raise RuntimeError(f"cannot run {len(items)} items")

    batcher: MicroBatcher[int, int] = MicroBatcher(broken, max_batch=8, max_wait_s=0.2)
    futures = [batcher.submit(i) for i in range(3)]
    for future in futures:
        with pytest.raises(RuntimeError, match="cannot run 3 items"):
            future.result(timeout=10)
    batcher.close(timeout=10)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(0)


def test_memory_budget_admits_only_what_fits() -> None:
    budget = MemoryBudget(250)
    inside, most_inside = 0, 0
    lock = threading.Lock()

    def job(size: int) -> None:
        nonlocal inside, most_inside
        with budget.reserve(size):
            with lock:
                inside += 1
                most_inside = max(most_inside, inside)
            time.sleep(0.02)  # long enough for the other threads to try to get in
            with lock:
                inside -= 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(job, [100] * 12))
    assert budget.peak == 200 and most_inside == 2 and budget.reserved == 0
    job(1000)  # larger than the whole budget: runs alone instead of waiting forever
    assert budget.peak == 1000


def test_big_uploads_are_decoded_reduced_within_the_budget(model_file: Path, monkeypatch) -> None:
    # The full-decoding limit scaled down with the image, so the test stays small.
    monkeypatch.setattr(web, "EXACT_DECODE_SIDE", 144)
    data = _smooth_png((1500, 1100))
    side = 144  # twice the model's resize of 72
    reduced_cost = decode_bytes(_write(data), at_least=(side, side))
    assert reduced_cost < decode_bytes(_write(data)) / 2
    app = create_app(model_file, memory_budget_bytes=2 * reduced_cost)
    service = app.state.service
    assert service.decode_at_least == (side, side)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        def ask(_: int) -> httpx.Response:
            return http.post("/api/predict", files={"file": ("big.png", data, "image/png")})

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(ask, range(6)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert responses[0].json()["image"] == {"width": 1500, "height": 1100, "format": "PNG"}
    assert reduced_cost <= service.budget.peak <= 2 * reduced_cost


def test_ordinary_uploads_get_the_cli_probabilities(model_file: Path) -> None:
    """Under twice EXACT_DECODE_SIDE the page decodes in full, as predict does: the same numbers."""
    data = _smooth_png((1500, 1100))
    predictor = load_predictor(model_file)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    expected = predictor.probabilities(predictor.preprocess(image)[None])[0]
    with TestClient(create_app(model_file)) as client:
        answer = client.post("/api/predict", files={"file": ("photo.png", data, "image/png")}).json()
    got = [answer["probabilities"][name] for name in predictor.class_names]
    assert got == pytest.approx([float(p) for p in expected], abs=1e-6)


def _write(data: bytes) -> Path:
    path = Path(tempfile.mkdtemp(prefix="test-serving-")) / "upload.png"
    path.write_bytes(data)
    return path


def _raw_request(url: str, head: bytes, body_parts: list[tuple[float, bytes]], wait_s: float = 15) -> bytes:
    """Send ``head`` then each body part after its delay on a raw socket; what the server answered
    before it closed the connection (or ``wait_s`` passed)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head)
        for delay, part in body_parts:
            time.sleep(delay)
            sock.sendall(part)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b'"}' in answer.split(b"\r\n\r\n", 1)[1]:
                    break
        except TimeoutError:
            pass
    return answer


def _multipart(data: bytes) -> tuple[bytes, bytes]:
    """Head (with Content-Length) and body of a one-file multipart upload of ``data``."""
    body = (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--x--\r\n")
    head = (b"POST /api/predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head, body


def test_a_stalled_body_gets_408(model_file: Path) -> None:
    head, body = _multipart(_png())
    with background_server(create_app(model_file, body_timeout_s=0.5)) as url:
        answer = _raw_request(url, head + body[:100], [])  # the rest never comes
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 0.5 s" in answer


def test_stalled_headers_are_cut_off_but_a_slow_body_in_time_is_not(model_file: Path) -> None:
    app = create_app(model_file, body_timeout_s=10)
    with background_server(app, header_timeout_s=0.3) as url:
        silent = _raw_request(url, b"", [])
        partial = _raw_request(url, b"POST /api/predict HTTP/1.1\r\nHost: test\r\n", [])
        head, body = _multipart(_png())
        slow_body = _raw_request(url, head + body[:100], [(0.6, body[100:])])
    assert silent.startswith(b"HTTP/1.1 408") and partial.startswith(b"HTTP/1.1 408")
    assert slow_body.startswith(b"HTTP/1.1 200"), slow_body[:300]


@pytest.mark.slow
def test_onnxruntime_back_end_for_a_model_file_keeps_explanations(model_file: Path, client) -> None:
    with TestClient(create_app(model_file, backend="onnxruntime")) as onnx_client:
        assert onnx_client.get("/healthz").json()["backend"] == "onnxruntime"
        source = onnx_client.get("/api/model").json()["source"]
        assert source["backend"] == "onnxruntime" and source["explainable"] is True
        assert source["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
        data = _png(seed=4)
        body = _upload(onnx_client, data, explain="true").json()
        expected = _upload(client, data).json()["probabilities"]
        assert body["probabilities"] == pytest.approx(expected, abs=1e-4)
        assert body["explanation"]["layers"] == {"gradcam": ["layer4"]}


def test_back_end_refusals(model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(BreastvisionError, match="unknown back-end 'tensorrt'"):
        create_app(model_file, backend="tensorrt")
    onnx_file = export_onnx(model_file, tmp_path / "m.onnx", opset=17, verify=False).path
    with pytest.raises(BreastvisionError, match="onnxruntime only"):
        create_app(onnx_file, backend="pytorch")


def test_auto_back_end_serves_pytorch_if_the_export_fails(model_file: Path, monkeypatch, caplog) -> None:
    from breastvision.serving import web

    def failing_export(model: Path, out: Path) -> Path:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(web, "_export_in_subprocess", failing_export)
    with TestClient(create_app(model_file, backend="auto")) as auto_client:
        assert auto_client.get("/healthz").json()["backend"] == "pytorch"
        assert _upload(auto_client, _png()).status_code == 200
    assert "ONNX export failed (unsupported operator)" in caplog.text
    with pytest.raises(BreastvisionError, match="ONNX export of resnet18.safetensors failed"):
        create_app(model_file, backend="onnxruntime")
