"""The bad-input corpus (``tests/badinput.py``) through every command that reads user files:
``predict`` (folder scan and named files), ``evaluate``, ``data summary`` and the web endpoint.

Every case must end as a processed file, a listed skip (one line, with a reason) or a one-line error,
and the good files handed over in the same call are always processed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from badinput import (
    GOOD_ROWS,
    IMAGE_CASES,
    MANIFEST_CASES,
    OUTSIDE,
    noise,
    write_image_corpus,
    write_manifest_case,
)
from breastvision.cli import main
from breastvision.data.io import file_problem, is_image_file
from breastvision.data.readers import read_dataset
from breastvision.evaluation.evaluate import SKIPPED_SHOWN
from breastvision.paths import printable
from breastvision.serving.web import create_app

GOOD = ("benign/good_b0.png", "benign/good_b1.jpg", "malignant/good_m0.png", "malignant/good_m1.tif")


@pytest.fixture(scope="module")
def model_file(make_model_file) -> Path:
    return make_model_file("resnet18", input_size=32)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A class-per-folder tree: four good images, and every image case inside ``benign/``."""
    root = tmp_path_factory.mktemp("corpus") / "tree"
    made = write_image_corpus(root / "benign")
    (root / "malignant").mkdir()
    for i, rel in enumerate(GOOD):
        noise(seed=60 + i).save(root / rel)
    return root, made


def _bad(made: dict[str, Path]) -> dict[str, Path]:
    return {name: path for name, path in made.items() if not IMAGE_CASES[name].usable}


def _usable(made: dict[str, Path]) -> dict[str, Path]:
    return {name: path for name, path in made.items() if IMAGE_CASES[name].usable}


def _one_line_reasons(reasons: dict[str, str]) -> None:
    assert all(reason and "\n" not in reason for reason in reasons.values()), reasons


def test_corpus_covers_the_kinds_asked_for(tree) -> None:
    _, made = tree
    assert len(_bad(IMAGE_CASES)) >= 31 and len(_usable(IMAGE_CASES)) >= 15
    assert len(MANIFEST_CASES) >= 15
    # Everything but the root-only permission case can be made on a POSIX file system.
    assert set(IMAGE_CASES) - set(made) <= {"unreadable_permissions", "non_utf8_name"}


def test_predict_folder_scan_lists_every_bad_file(tree, model_file: Path, tmp_path: Path) -> None:
    root, made = tree
    out = tmp_path / "predictions.json"
    assert main(["predict", str(model_file), str(root), "--out", str(out)]) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    predicted = {p["path"] for p in document["predictions"]}
    skipped = {s["path"]: s["reason"] for s in document["skipped"]}
    _one_line_reasons(skipped)

    def shown(path: Path) -> str:
        return printable(Path(os.path.abspath(path)).relative_to(root.parent))

    assert {shown(root / rel) for rel in GOOD} <= predicted
    assert {shown(path) for path in _usable(made).values()} <= predicted
    for name, path in _bad(made).items():
        assert shown(path) not in predicted, name
        if is_image_file(path) or file_problem(path):
            assert printable(path) in skipped, name
        else:  # a regular file without an image extension (figure.eps): not an input of a folder scan
            assert printable(path) not in skipped, name


def test_predict_named_files_lists_every_bad_file_in_utf8(tree, model_file: Path, tmp_path: Path) -> None:
    root, made = tree
    # A link to a folder named on the command line is a folder given: it is followed, not skipped.
    made = {name: path for name, path in made.items() if not (path.is_symlink() and path.is_dir())}
    out = tmp_path / "predictions.csv"
    named = [root / GOOD[0], *made.values(), root / GOOD[-1]]
    assert main(["predict", str(model_file), *map(str, named), "--out", str(out)]) == 0
    with out.open(encoding="utf-8", newline="") as handle:  # strict UTF-8, whatever the names held
        rows = list(csv.DictReader(handle))
    predicted = {r["path"] for r in rows if r["predicted"]}
    skipped = {r["path"]: r["skipped"] for r in rows if not r["predicted"]}
    _one_line_reasons(skipped)
    assert {printable(root / GOOD[0]), printable(root / GOOD[-1])} <= predicted
    assert {printable(p) for p in _usable(made).values()} <= predicted
    assert {printable(p) for p in _bad(made).values()} <= set(skipped)
    assert len(rows) == len(named)


def test_evaluate_completes_and_lists_undecodable_files(tree, model_file: Path, tmp_path: Path, caplog):
    root, made = tree
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING, logger="breastvision.evaluation.evaluate"):
        assert main(["evaluate", str(model_file), str(root), "--out", str(out), "--n-resamples", "0"]) == 0
    # Named one by one up to a limit, then counted: the full list is in skipped.csv.
    assert len(caplog.records) == SKIPPED_SHOWN + 1 and "skipped.csv" in caplog.records[-1].getMessage()
    with (out / "predictions.csv").open(encoding="utf-8", newline="") as handle:
        evaluated = {r["path"] for r in csv.DictReader(handle)}
    with (out / "skipped.csv").open(encoding="utf-8", newline="") as handle:
        skipped = {r["path"]: r["reason"] for r in csv.DictReader(handle)}
    _one_line_reasons(skipped)
    assert set(GOOD) <= evaluated
    assert {printable(p.relative_to(root).as_posix()) for p in _usable(made).values()} <= evaluated
    assert {printable(p) for p in _bad(made).values()} <= set(skipped)
    # Truncated pixel data passes the readers' header check: evaluate itself found and listed it.
    assert "corrupt or truncated" in skipped[printable(made["png_cut_90"])]
    assert "[skipped.csv](skipped.csv)" in (out / "report.md").read_text()


def test_data_summary_verify_lists_every_bad_file(tree, tmp_path: Path) -> None:
    root, made = tree
    summary_file = tmp_path / "summary.json"
    assert main(["data", "summary", str(root), "--verify", "--json", str(summary_file)]) == 0
    summary = json.loads(summary_file.read_text())[0]
    assert summary["images"] == len(GOOD) + len(_usable(made))
    catalog = read_dataset(root, verify=True)  # what the command summarised, path by path
    skipped = {s.path: s.reason for s in catalog.skipped}
    _one_line_reasons(skipped)
    assert summary["skipped"]["total"] == len(skipped)
    assert set(_bad(made).values()) <= set(skipped)
    assert {r.path for r in catalog.records} == {root / rel for rel in GOOD} | set(_usable(made).values())


@pytest.fixture(scope="module")
def client(model_file: Path):
    with TestClient(create_app(model_file)) as test_client:
        yield test_client


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_web_upload(client, tree, name: str) -> None:
    _, made = tree
    path = made.get(name)
    if path is None or file_problem(path) or not os.access(path, os.R_OK):
        pytest.skip(f"{name}: not a readable regular file here, so nothing to upload")
    response = client.post("/api/predict", files={"file": ("upload.png", path.read_bytes(), "image/png")})
    if IMAGE_CASES[name].usable:
        assert response.status_code == 200, response.text
        assert response.json()["predicted_class"] in {"benign", "malignant", "normal"}
    else:
        assert response.status_code in {400, 413, 415}, response.text
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("breastvision: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", sorted(MANIFEST_CASES))
def test_manifest_case(name: str, model_file: Path, tmp_path: Path, capsys) -> None:
    case = MANIFEST_CASES[name]
    manifest = write_manifest_case(case, tmp_path)
    summary_argv = ["data", "summary", str(manifest), "--json", str(tmp_path / "summary.json")]
    evaluate_argv = ["evaluate", str(model_file), str(manifest), "--out", str(tmp_path / "report"),
                     "--n-resamples", "0"]
    if case.error:
        for argv in (summary_argv, evaluate_argv):
            assert main(argv) == 2
            assert case.error in _error_line(capsys)
        return
    assert main(summary_argv) == 0
    catalog = read_dataset(manifest)
    data = manifest.parent
    # The root never widens past the manifest's folder, whatever a row points at: nothing above it
    # is scanned, and a row outside it is one listed skip.
    assert catalog.root.is_relative_to(data) and len(catalog.skipped) <= 5
    for skip in catalog.skipped:
        assert skip.path.is_relative_to(data) or "outside the manifest's folder" in skip.reason, skip
    assert {data / rel for rel, _ in GOOD_ROWS} <= {r.path for r in catalog.records}
    reasons = [s.reason for s in catalog.skipped]
    for expected in case.skips:
        assert any(expected in reason for reason in reasons), (expected, reasons)
    if "outside" in name or "dotdot" in name or "root" in name:
        assert tmp_path / OUTSIDE not in {r.path for r in catalog.records}
    assert main(evaluate_argv) == 0
    with (tmp_path / "report" / "predictions.csv").open(encoding="utf-8", newline="") as handle:
        evaluated = {r["path"] for r in csv.DictReader(handle)}
    assert {rel.removeprefix("imgs/") for rel, _ in GOOD_ROWS} <= {p.removeprefix("imgs/") for p in evaluated}
