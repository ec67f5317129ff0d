"""Experiment configs: YAML with ``extends``, dotted overrides, one-line errors; the shipped configs load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from breastvision.cli import main
from breastvision.errors import BreastvisionError
from breastvision.training.config import load_config, resolve_weights
from breastvision.training.transfer import stage_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_extends_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "name: base\ntrain: {epochs: 30, lr: 1e-3, optimizer: adam}\n"
           "model: {name: resnet18, kwargs: {a: 1}}\n")
    child = _write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\ntrain: {epochs: 5}\n")
    config = load_config(child, ["train.batch_size=8", "model.kwargs.b=0.5", "data.stain.method=reinhard"])
    assert (config.name, config.train.epochs, config.train.batch_size) == ("child", 5, 8)
    assert config.train.lr == pytest.approx(1e-3)  # YAML 1.1 would read "1e-3" as a string
    assert config.train.optimizer == "adam"
    assert config.model.kwargs == {"a": 1, "b": 0.5}
    assert config.data.stain is not None and config.data.stain.method == "reinhard"
    saved = tmp_path / "saved.yaml"  # as a run folder's config.yaml holds it: every default spelled out
    saved.write_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict()))))
    assert load_config(saved) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=2"], "train.epoch: unknown key"),
        (["train.epochs=two"], "train.epochs: Input should be a valid integer"),
        (["train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
        (["train.optimizer=rmsprop"], "train.optimizer: Input should be 'adam', 'adamw' or 'sgd'"),
        (["data=busi"], "data: Input should be a dictionary"),
        (["train.epochs"], "is not of the form key=value"),
        (["train.epochs.x=1"], "'epochs' is a value, not a section"),
    ],
)
def test_bad_configs_raise_one_clear_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    path = _write(tmp_path / "c.yaml", "train: {epochs: 3}\n")
    with pytest.raises(BreastvisionError, match=message) as err:
        load_config(path, overrides)
    assert "\n" not in str(err.value)


def test_cli_reports_config_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path / "c.yaml", "name: x\ntrain: {epochs: 3, bogus: 1}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"breastvision: error: config {path}: train.bogus: unknown key"
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_weights_resolve_under_the_weights_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path.parent)
    assert resolve_weights("w.safetensors", tmp_path) == str(tmp_path / "w.safetensors")
    assert resolve_weights("imagenet", tmp_path) == "imagenet"
    assert resolve_weights(None, tmp_path) is None
    with pytest.raises(BreastvisionError, match="not found"):
        resolve_weights("absent.safetensors", tmp_path)


def test_weights_root_follows_the_data_root_not_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from breastvision.training.config import WEIGHTS_ENV_VAR, weights_root

    (tmp_path / "data").mkdir()
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.delenv("BREASTVISION_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "data")  # wherever the command runs from
    assert weights_root(None, tmp_path / "data") == tmp_path / "weights"
    monkeypatch.setenv("BREASTVISION_DATA", str(tmp_path / "data"))
    assert weights_root() == tmp_path / "weights"
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(tmp_path / "elsewhere"))
    assert weights_root(None, tmp_path / "data") == tmp_path / "elsewhere"
    assert weights_root(tmp_path / "given") == tmp_path / "given"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path, tmp_path: Path) -> None:
    if "stages:" in path.read_text():
        configs = stage_configs(path, ["train.epochs=1"], out=tmp_path)
        assert configs[-1].model.pretrained == str(configs[-2].run_dir / "model.safetensors")
        assert all(c.train.epochs == 1 for c in configs)
    else:
        assert load_config(path).name == path.stem


def test_chain_overrides_target_one_stage(tmp_path: Path) -> None:
    chain = CONFIGS / "breakhis_multilevel_cpu.yaml"
    lc, bh = stage_configs(chain, ["breakhis.data.fold=3", "train.batch_size=4"], out=tmp_path)
    assert (lc.data.fold, bh.data.fold) == (None, 3)
    assert (lc.train.batch_size, bh.train.batch_size) == (4, 4)
    assert (lc.run_dir, bh.run_dir) == (tmp_path / "lc25000", tmp_path / "breakhis_fold3")
    assert (lc.model.first_trainable_stage, bh.model.first_trainable_stage) == ("denseblock3", "head")
    # The paper's chain: our reading of which blocks learn at each stage (training/transfer.py).
    lc, bh = stage_configs(CONFIGS / "breakhis_multilevel_paper.yaml", out=tmp_path)
    assert (lc.model.first_trainable_stage, bh.model.first_trainable_stage) == ("denseblock3", "denseblock4")
    assert (lc.train.epochs, bh.train.epochs, bh.train.batch_size, bh.train.lr) == (200, 200, 16, 0.01)


def test_configs_ship_in_the_package_and_load_by_name_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from breastvision.paths import CONFIGS_DIR

    # One copy: the repository's configs/ is the package's folder, so the two cannot drift.
    assert CONFIGS.resolve() == CONFIGS_DIR and CONFIGS_DIR.parent.name == "breastvision"
    monkeypatch.chdir(tmp_path)  # a folder without configs/
    shipped = load_config(CONFIGS_DIR / "busi_fusion_cpu_noaug.yaml")
    assert load_config("configs/busi_fusion_cpu_noaug.yaml") == shipped
    assert load_config("busi_fusion_cpu_noaug.yaml") == shipped
    (tmp_path / "busi_fusion_cpu_noaug.yaml").write_text("name: mine\n")
    assert load_config("busi_fusion_cpu_noaug.yaml").name == "mine"  # a file that exists wins
    with pytest.raises(BreastvisionError, match="not found"):
        load_config("no_such_config.yaml")
