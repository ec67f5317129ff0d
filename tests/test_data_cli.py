"""``breastvision data summary`` / ``data split``: output on real and generated data."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
from PIL import Image

from breastvision.data import cli
from breastvision.data.splits import Split
from breastvision.errors import BreastvisionError


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # Rich wraps tables at 80 columns when not writing to a terminal; keep rows on one line.
    monkeypatch.setenv("COLUMNS", "250")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="breastvision")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_help_has_one_line_per_command(capsys):
    with pytest.raises(SystemExit):
        run("data", "--help")
    out = capsys.readouterr().out
    assert "summary" in out and "split" in out and "counts per class" in out


def test_summary_of_every_shared_dataset(data_root, capsys, tmp_path):
    assert run("data", "summary", "--data", str(data_root), "--json", str(tmp_path / "s.json")) == 0
    out = _plain(capsys.readouterr().out)
    summaries = {s["dataset"]: s for s in json.loads((tmp_path / "s.json").read_text())}
    busi = summaries["busi"]
    assert {k: v["images"] for k, v in busi["classes"].items()} == {
        "normal": 106,
        "benign": 349,
        "malignant": 168,
    }
    assert busi["masks"]["images_without"] == 0 and busi["masks"]["total"] >= 623
    assert busi["near_duplicates"]["groups"] > 0 and busi["near_duplicates"]["label_conflicts"]
    breakhis = summaries["breakhis"]
    assert breakhis["images"] == 714 and breakhis["groups"]["count"] == 40
    assert {k: v["images"] for k, v in breakhis["classes"].items()} == {"benign": 173, "malignant": 541}
    assert breakhis["magnifications"] == {"200X": {"benign": 173, "malignant": 541}}
    lc = summaries["lc25000"]
    assert lc["images"] == 2959 and lc["groups"]["count"] == 740 and lc["grouping"] == "tile_group"
    assert summaries["breakhis_samples"]["images"] == 16
    for line in [
        "busi: 623 images used, 0 files skipped",
        "breakhis: 714 images used",
        "lc25000: 2959 images used",
        "label conflicts:",
    ]:
        assert line in out


def test_summary_group_by_patient(data_root, capsys):
    run("data", "summary", "breakhis", "--data", str(data_root), "--group-by", "patient")
    out = _plain(capsys.readouterr().out)
    assert "714 images, 2 classes, 36 groups (grouping: patient)" in out


def test_summary_lists_skips_and_ends_with_their_count(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / name / "ok.png")
    (tmp_path / "a" / "zero.png").touch()
    (tmp_path / "b" / "one.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(tmp_path / "b" / "dot.png")
    assert run("data", "summary", str(tmp_path)) == 0
    out = _plain(capsys.readouterr().out)
    assert "empty file (0 bytes) │ 2" in out
    assert "below the 32-pixel minimum side" in out
    assert out.rstrip().endswith(
        f"{tmp_path.name}: 2 images used, 3 files skipped (2 distinct reasons, listed above)"
    )
    with pytest.raises(BreastvisionError, match="group_by do not apply to class-folders"):
        run("data", "summary", str(tmp_path), "--group-by", "patient")


def test_split_command_writes_a_checked_file(data_root, tmp_path, capsys):
    out_file = tmp_path / "breakhis_kfold.json"
    run(
        "data",
        "split",
        "breakhis",
        "--data",
        str(data_root),
        "--protocol",
        "group_kfold",
        "--out",
        str(out_file),
    )
    out = _plain(capsys.readouterr().out)
    assert "leak-free: groups on more than one side: 0 (of 40 slide groups)" in out
    split = Split.load(out_file)
    assert split.protocol == "group_kfold" and split.n_files == 714 and not split.leaky
    catalog = split.read_catalog(data_root)
    assert sum(len(split.subset(catalog, "test", fold)) for fold in range(5)) == 714

    leaky_file = tmp_path / "h.json"
    run(
        "data", "split", "breakhis", "--data", str(data_root),
        "--protocol", "h_random_712_after_aug", "--out", str(leaky_file), "--seed", "2",
    )  # fmt: skip
    out = _plain(capsys.readouterr().out)
    assert "LEAKY" in out and "augmented copies on more than one side" in out
    assert Split.load(leaky_file).leaky
