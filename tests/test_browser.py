"""The web page in a real browser: Debian's headless Chromium, driven by Playwright.

CI installs the browser with ``apt-get install -y chromium`` (never ``playwright install``, which
downloads one). The test uploads a real BUSI image, reads the prediction off the page, checks it
against the model run directly, and saves a screenshot (also into ``$BREASTVISION_SCREENSHOT_DIR``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from breastvision.data.io import load_image
from breastvision.models.bundle import ModelBundle
from breastvision.serving.predict import is_mask, load_predictor
from breastvision.serving.web import create_app
from webserver import background_server

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} absent (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


def test_upload_a_busi_image_and_read_the_prediction(browser, make_model_file, busi_dir, tmp_path) -> None:
    image_path = next(p for p in sorted((busi_dir / "malignant").glob("*.png")) if not is_mask(p))
    bundle = ModelBundle.load(make_model_file("resnet18", input_size=64, resize=72))
    bundle.operating_points = {"positive_class": "malignant", "target_sensitivity": 0.95,
                               "thresholds": {"sensitivity>=0.95": 0.0, "youden": 1.0}}
    model_file = bundle.save(tmp_path / "with_operating_points.safetensors")
    with background_server(create_app(model_file)) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requested: list[str] = []
        problems: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: problems.append(str(err)))

        page.goto(url)
        page.wait_for_selector("#card-facts dd")
        assert page.text_content("#model-title").startswith("resnet18")
        assert "random init" in page.text_content("#card-lineage")
        assert "val.accuracy" in page.text_content("#card-metrics")

        page.set_input_files("#file", str(image_path))
        page.check("#explain")
        page.click("#predict-button")
        page.wait_for_selector('#result[data-state="done"]', timeout=60_000)
        predicted = page.text_content("#predicted-class")
        bars = {
            row.get_attribute("data-class"): float(row.get_attribute("data-probability"))
            for row in page.query_selector_all("#probabilities .bar-row")
        }
        overlay_width = page.eval_on_selector("#overlay-gradcam img", "img => img.naturalWidth")
        decisions = {
            row.get_attribute("data-operating-point"): row.text_content()
            for row in page.query_selector_all("#decisions li")
        }

        screenshot = tmp_path / "breastvision-serve.png"
        page.screenshot(path=str(screenshot), full_page=True)
        if os.environ.get("BREASTVISION_SCREENSHOT_DIR"):
            target = Path(os.environ["BREASTVISION_SCREENSHOT_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(screenshot, target / screenshot.name)

        # A file that is not an image gets the server's reason on the page, not a silent failure.
        not_image = tmp_path / "report.png"
        not_image.write_text("not an image")
        page.set_input_files("#file", str(not_image))
        page.click("#predict-button")
        page.wait_for_selector('#result[data-state="error"]')
        assert "not an image" in page.text_content("#error")
        page.close()

    predictor = load_predictor(model_file)
    image = load_image(image_path)
    expected = predictor.probabilities(predictor.preprocess(image)[None])[0]
    assert list(bars) == predictor.class_names
    for name, p in zip(predictor.class_names, expected, strict=True):
        assert bars[name] == pytest.approx(float(p), abs=1e-6)
    assert predicted == predictor.class_names[int(expected.argmax())]
    # Thresholds 0 and 1 fix the decisions, whatever the untrained model's probabilities.
    assert decisions == {"sensitivity>=0.95": "at sensitivity>=0.95 (P(malignant) ≥ 0.000): malignant",
                         "youden": "at youden (P(malignant) ≥ 1.000): not malignant"}
    assert overlay_width == round(image.width * min(1.0, 1024 / max(image.size)))
    assert screenshot.stat().st_size > 10_000
    assert all(u.startswith((url, "data:", "blob:")) for u in requested), requested
    assert [p for p in problems if "415" not in p] == []  # the refused text file's 415 is expected


def test_an_image_outside_the_scope_gets_the_notice(browser, make_model_file, busi_dir, tmp_path) -> None:
    from breastvision.models.scope import PRE_LOGITS, Layer, Scope

    image_path = next(p for p in sorted((busi_dir / "benign").glob("*.png")) if not is_mask(p))
    bundle = ModelBundle.load(make_model_file("resnet18", input_size=64, resize=72))
    seen = {}
    for threshold in (0.0, 1e9):  # every image outside, then every image inside
        bundle.scope = Scope([Layer(PRE_LOGITS, torch.zeros(3, 512), torch.eye(512))], threshold)
        model_file = bundle.save(tmp_path / f"scope_{threshold:g}.safetensors")
        with background_server(create_app(model_file)) as url:
            page = browser.new_page()
            page.goto(url)
            page.set_input_files("#file", str(image_path))
            page.click("#predict-button")
            page.wait_for_selector('#result[data-state="done"]', timeout=60_000)
            seen[threshold] = (page.is_visible("#scope-notice"), page.text_content("#scope-notice"),
                               float(page.get_attribute("#scope-notice", "data-scope-score")))
            page.close()
    assert seen[0.0][0] and "Outside this model's scope" in seen[0.0][1]
    assert not seen[1e9][0]
    assert seen[0.0][2] == pytest.approx(seen[1e9][2]) and seen[0.0][2] > 0
