"""The web page and REST API: model card, predictions, explanations, upload checks, concurrency."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from breastvision.serving.export import export_onnx
from breastvision.serving.predict import load_predictor
from breastvision.serving.web import STATIC_DIR, background_server, create_app

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
    app = create_app(model_file)
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
