"""``breastvision reproduce breakhis``: the Table 3-5 builder and the orchestration, on stand-in runs.

Training is replaced by functions that write small but real run folders (predictions, metrics with
patient-bootstrap intervals, provenance facts), so the real cross-validation pooling
(``aggregate_runs``) and the real table code run in seconds. The real three-stage chain on shared
images is covered by ``tests/test_training_transfer.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from breastvision.errors import BreastvisionError
from breastvision.evaluation.report import evaluate_predictions
from breastvision.reproduce import breakhis
from breastvision.training.run_record import Predictions, RunRecord

CLASSES = ["benign", "malignant"]


def _fake_run(run_dir: Path, seed: int, images: list[str], seconds: float = 60.0) -> Path:
    """A finished run folder testing ``images`` (patient = the name's prefix before '-')."""
    rng = np.random.default_rng(seed)
    y = np.array([i % 2 for i in range(len(images))])
    p1 = np.clip(0.7 * y + 0.3 * rng.random(len(images)), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    groups = [name.split("-")[0] for name in images]
    run_dir.mkdir(parents=True, exist_ok=True)
    Predictions(images, groups, y, probs, CLASSES).save(run_dir / "predictions.csv")
    metrics = evaluate_predictions(y, probs, CLASSES, groups, n_resamples=20)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, default=float))
    (run_dir / "split.json").write_text(json.dumps({"grouping": "patient", "protocol": "x", "seed": seed}))
    facts = {
        "parameters": 7_000_000,
        "trainable_parameters": 2_000_000,
        "model_file_mb": 27.5,
        "device": "cpu",
        "best_epoch": 3,
        "seconds_to_best_epoch": seconds,
        "wall_clock_seconds_this_session": 2 * seconds,
    }
    (run_dir / "provenance.json").write_text(json.dumps({"facts": facts}))
    (run_dir / "model.safetensors").write_bytes(b"")
    return run_dir


def _fold_images(fold: int) -> list[str]:
    return [f"p{fold}{j // 3}-200-{j}.png" for j in range(6)]


@pytest.fixture()
def stand_ins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list]:
    """Replace training by fake run folders; record what each entry point was asked."""
    from breastvision.training import crossval, engine, transfer

    calls: dict[str, list] = {"crossval": [], "chain": [], "train": []}
    real_aggregate = crossval.aggregate_runs

    def fake_crossval(config_path, folds, overrides, out, *, title=None):
        calls["crossval"].append((Path(config_path).name, list(overrides), Path(out)))
        runs = [RunRecord.load(_fake_run(Path(out) / f"fold{k}", k, _fold_images(k))) for k in range(folds)]
        summary = real_aggregate(runs, out, title=title or "cv", n_resamples=20)
        return crossval.CrossValidation(Path(out), runs, summary)

    def fake_chain(path, overrides, out):
        calls["chain"].append((Path(path).name, list(overrides)))
        lc = _fake_run(Path(out) / "lc25000", 99, ["lc-0.png", "lc-1.png"], seconds=600.0)
        fold = next(o.split("=")[1] for o in overrides if o.startswith("breakhis.data.fold="))
        name = "breakhis" if fold == "null" else f"breakhis_fold{fold}"
        images = _fold_images(int(fold)) if fold != "null" else ["q0-200-0.png", "q0-200-1.png"]
        return [RunRecord.load(lc), RunRecord.load(_fake_run(Path(out) / name, 7, images))]

    def fake_train(config, resume=None, out=None):
        calls["train"].append(config)
        return _fake_run(Path(out), 5, ["r0-200-0.png", "r0-200-1.png", "r1-200-2.png", "r1-200-3.png"])

    monkeypatch.setattr(crossval, "run_crossval", fake_crossval)
    monkeypatch.setattr(crossval, "aggregate_runs", lambda *a, **k: real_aggregate(*a, **k, n_resamples=20))
    monkeypatch.setattr(transfer, "run_chain", fake_chain)
    monkeypatch.setattr(engine, "train", fake_train)
    return calls


def _args(tmp_path: Path, held: tuple[int, ...] = (200,), **extra: Any) -> argparse.Namespace:
    """Command arguments over a tiny BreakHis folder: two patients per class at each magnification."""
    from PIL import Image

    data = tmp_path / "data"
    images = data / "breakhis_200x_224"
    images.mkdir(parents=True, exist_ok=True)
    for mag in held:
        for name in ("SOB_B_TA-14-1001", "SOB_B_F-14-1002", "SOB_M_DC-14-2001", "SOB_M_LC-14-2002"):
            Image.new("RGB", (32, 32)).save(images / f"{name}-{mag}-001.png")
    (data / "breakhis_samples").mkdir(exist_ok=True)
    (data / "breakhis_samples" / breakhis.STAIN_REFERENCE).write_bytes(b"")
    parser = argparse.ArgumentParser()
    breakhis.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--data", str(data), "--folds", "3"])
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def test_reproduce_runs_every_protocol_and_writes_tables(
    stand_ins: dict[str, list], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = _args(tmp_path)
    assert breakhis.run(args) == 0
    out = tmp_path / "out"
    markdown = (out / "reproduce_breakhis.md").read_text()
    assert markdown.strip() in capsys.readouterr().out

    # Two single-config cross-validations, with the fixed stain reference and one thread each.
    reference = (tmp_path / "data" / "breakhis_samples" / breakhis.STAIN_REFERENCE).resolve()
    assert [c[0] for c in stand_ins["crossval"]] == [
        "breakhis_densenet_block4_cpu.yaml",
        "breakhis_densenet_se_block4_cpu.yaml",
    ]
    for _, overrides, out_dir in stand_ins["crossval"]:
        assert "train.threads=1" in overrides and f"data.stain.reference={reference}" in overrides
        # One magnification in the data: no filter and no <mag>/ folder, so earlier runs are reused.
        assert not any("magnification" in o for o in overrides) and out_dir.parent == out / "cv"
    # The chain: one call per fold (the BreakHis stage's stain reference only), then the leaky one.
    folds = [next(o for o in ov if o.startswith("breakhis.data.fold=")) for _, ov in stand_ins["chain"]]
    assert folds == [f"breakhis.data.fold={k}" for k in range(3)] + ["breakhis.data.fold=null"]
    assert all(f"breakhis.data.stain.reference={reference}" in ov for _, ov in stand_ins["chain"])
    # Leaky single runs: the random image split, no fold.
    assert [c.data.split.protocol for c in stand_ins["train"]] == ["h_random_712", "h_random_712"]
    assert all(c.data.fold is None for c in stand_ins["train"])

    # The multi-level CV is pooled over its fold folders, not the LC25000 stage.
    pooled = json.loads((out / "cv" / "multilevel" / "crossval.json").read_text())
    assert len(pooled["per_fold"]) == 3 and pooled["pooled"]["n_images"] == 18

    document = json.loads((out / "reproduce_breakhis.json").read_text())
    assert document["magnifications"]["run"] == ["200X"]
    cv = document["results"]["200X"]["cv"]
    assert set(cv) == set(breakhis.MODELS)
    assert cv["multilevel"]["wall_clock_seconds_total"] == pytest.approx(3 * 120 + 1200)
    assert cv["densenet"]["seconds_to_best_epoch_mean"] == pytest.approx(60)

    table3 = markdown.split("## Table 3")[1].split("## Details")[0]
    lines = [line for line in table3.splitlines() if line.startswith("| this run")]
    assert len(lines) == 6  # 3 models x (leaky random split, cross-validation)
    assert sum("LEAKY" in line for line in lines) == 3
    p_arp = cv["densenet_se"]["metrics"]["intervals"]["patient.P_arp"]
    cv_row = next(line for line in lines if "DenseNet+SE" in line and "CV" in line)
    cells = [c.strip() for c in cv_row.strip("|").split("|")]
    # 40X and 100X not run; 200X holds our value in percent with its interval.
    assert cells[3:5] == ["—", "—"] and cells[6] == "—"
    assert cells[5].startswith(f"{100 * p_arp['value']:.1f} (")
    assert "| paper | random 7:1:2 after 5x augmentation (LEAKY) | DenseNet | 73.9 | 75.0 | 77.6 |" in table3
    assert "Run: 200X, 4 images of 4 slides and 4 patients (the only magnification" in table3
    assert "Not run ('—'): 40X/100X/400X not in the data." in table3
    # Table 5: 60 s to the best epoch per fold; the LC25000 stage's 600 s shown once.
    assert "| this run | 200X | multi-level (proposed) | 1.00 | 10.00 |" in markdown
    assert "1207" in markdown and "RTX 2080 Ti" in markdown


def _table3_cells(markdown: str, model: str) -> list[str]:
    table3 = markdown.split("## Table 3")[1].split("## Details")[0]
    row = next(
        line
        for line in table3.splitlines()
        if line.startswith("| this run") and "CV" in line and f"| {model} |" in line
    )
    return [c.strip() for c in row.strip("|").split("|")]


def test_every_magnification_in_the_data_is_run_on_its_own(
    stand_ins: dict[str, list], tmp_path: Path
) -> None:
    assert breakhis.run(_args(tmp_path, held=(40, 200))) == 0
    out = tmp_path / "out"
    # Each single-config cross-validation once per magnification, filtered and in its own folder.
    assert [(c[1][-1], c[2]) for c in stand_ins["crossval"]] == [
        (f"data.split={breakhis.CV_SPLIT}", out / mag / "cv" / key)
        for mag in ("40X", "200X")
        for key in ("densenet", "densenet_se")
    ]
    filters = [[o for o in ov if ".magnification=" in o] for _, ov, _ in stand_ins["crossval"]]
    assert filters == [["data.options.magnification=40"]] * 2 + [["data.options.magnification=200"]] * 2
    # The chain filters its BreakHis stage only; 3 folds + the leaky run per magnification.
    filters = [[o for o in ov if ".magnification=" in o] for _, ov in stand_ins["chain"]]
    assert (
        filters
        == [["breakhis.data.options.magnification=40"]] * 4
        + [["breakhis.data.options.magnification=200"]] * 4
    )
    assert (out / "40X" / "multilevel" / "breakhis_fold2").is_dir()
    assert (out / "200X" / "cv" / "multilevel" / "crossval.json").is_file()
    assert [c.data.options["magnification"] for c in stand_ins["train"]] == [40, 40, 200, 200]

    markdown = (out / "reproduce_breakhis.md").read_text()
    cells = _table3_cells(markdown, "DenseNet")
    # source, protocol, model, P_arp 40X..400X, P_img 40X..400X: 40X and 200X filled, no others.
    assert [c == "—" for c in cells[3:]] == [False, True, False, True] * 2
    assert "Run: 40X, 4 images of 4 slides and 4 patients; 200X, 4 images" in markdown
    assert "each magnification trained and tested on its own images" in markdown
    assert "Not run ('—'): 100X/400X not in the data." in markdown
    assert "| this run | 40X | DenseNet |" in markdown and "| this run | 200X | DenseNet |" in markdown
    document = json.loads((out / "reproduce_breakhis.json").read_text())
    assert list(document["results"]) == ["40X", "200X"]
    assert document["magnifications"]["present"]["40X"] == {"images": 4, "slides": 4, "patients": 4}


def test_magnifications_option_restricts_the_runs(stand_ins: dict[str, list], tmp_path: Path) -> None:
    assert breakhis.run(_args(tmp_path, held=(40, 200), magnifications="200")) == 0
    out = tmp_path / "out"
    assert {c[2].parent for c in stand_ins["crossval"]} == {out / "200X" / "cv"}
    assert all("breakhis.data.options.magnification=200" in ov for _, ov in stand_ins["chain"])
    assert not (out / "40X").exists()
    markdown = (out / "reproduce_breakhis.md").read_text()
    assert [c == "—" for c in _table3_cells(markdown, "DenseNet+SE")[3:]] == [True, True, False, True] * 2
    assert "Not run ('—'): 40X left out by --magnifications; 100X/400X not in the data." in markdown


def test_absent_or_unknown_magnification_is_a_clear_error(stand_ins: dict[str, list], tmp_path: Path) -> None:
    with pytest.raises(BreastvisionError, match=r"--magnifications: 100X, 400X not in the data .*holds 200X"):
        breakhis.run(_args(tmp_path, magnifications="400X,100X"))
    with pytest.raises(BreastvisionError, match="--magnifications: magnification '300X' is not one of"):
        breakhis.run(_args(tmp_path, magnifications="200X,300X"))
    assert not stand_ins["crossval"] and not stand_ins["chain"]


def test_skip_random_leaves_the_leaky_rows_out(stand_ins: dict[str, list], tmp_path: Path) -> None:
    assert breakhis.run(_args(tmp_path, skip_random=True)) == 0
    markdown = (tmp_path / "out" / "reproduce_breakhis.md").read_text()
    assert not stand_ins["train"] and len(stand_ins["chain"]) == 3
    assert "Not run: the leaky random-split rows" in markdown
    assert not any("LEAKY" in line for line in markdown.splitlines() if line.startswith("| this run"))


def test_finished_run_of_another_config_is_an_error(tmp_path: Path) -> None:
    from breastvision.training.config import load_config
    from breastvision.training.crossval import train_or_reuse

    def save_config(config, path: Path) -> None:
        path.write_text(json.dumps(config.to_dict()))  # JSON is YAML

    configs = breakhis._configs_dir(None)
    config = load_config(configs / breakhis.PRESETS["cpu"].densenet)
    run_dir = _fake_run(tmp_path / "run", 0, ["a-1.png", "b-2.png"])
    save_config(
        load_config(configs / breakhis.PRESETS["cpu"].densenet, ["train.epochs=1"]), run_dir / "config.yaml"
    )
    with pytest.raises(BreastvisionError, match="different configuration"):
        train_or_reuse(config, run_dir, "densenet")
    save_config(
        load_config(configs / breakhis.PRESETS["cpu"].densenet, ["train.threads=2"]), run_dir / "config.yaml"
    )
    assert train_or_reuse(config, run_dir, "densenet").run_dir == run_dir  # threads: speed, not results


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BreastvisionError, match="--folds"):
        breakhis.run(_args(tmp_path, folds=1))
    with pytest.raises(BreastvisionError, match="configs"):
        breakhis._configs_dir(tmp_path)
    missing = _args(tmp_path, data=tmp_path / "nowhere")
    with pytest.raises(BreastvisionError, match="breakhis"):
        breakhis.run(missing)
