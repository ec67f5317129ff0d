"""The auxiliary mask head on a single CNN (``seg_head=True``, ``models.masking``): the split suffix
gives what the whole model gives, a step trains the head and the trainable blocks while the frozen
prefix stays bit-identical, a split that freezes the map is refused, and weights load and predict
with or without the head."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.masking import at_size
from breastvision.models.registry import create_model
from breastvision.models.staging import split_model, split_stage_names
from breastvision.models.weights import RANDOM_INIT
from breastvision.training.feature_cache import module_hash
from breastvision.training.freezing import freeze_before
from breastvision.training.segmentation import mask_loss

SIDE = 64
#: Per architecture, the split that trains its last block (the one computing the map the head reads).
LAST_BLOCK = {"densenet121": "denseblock4", "densenet121_se": "denseblock4", "resnet18": "layer4",
              "googlenet": "inception5"}


def _model(name: str = "densenet121", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=3, **kwargs).eval()


def _target(batch: int) -> torch.Tensor:
    target = torch.zeros(batch, 1, SIDE, SIDE, dtype=torch.bool)
    target[:, :, 10:40, 20:50] = True
    return target


@pytest.mark.parametrize("name", sorted(LAST_BLOCK))
def test_split_suffix_with_mask_equals_the_whole_model(name: str) -> None:
    masked, plain = _model(name, seg_head=True), _model(name)
    x = torch.randn(2, 3, SIDE, SIDE)
    prefix, suffix = split_model(masked, LAST_BLOCK[name])
    with torch.no_grad():
        logits, mask_logits = masked.forward_with_mask(x)
        split_logits, split_mask = suffix.forward_with_mask(prefix(x))
        torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)  # the head draws after the rest
        torch.testing.assert_close(suffix(prefix(x)), logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(split_logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(split_mask, mask_logits, rtol=0, atol=1e-6)
    assert mask_logits.shape == (2, 1, SIDE // 32, SIDE // 32)  # the map's resolution (stride 32)
    assert masked.model_kwargs["seg_head"] is True and masked.weights_origin["seg_head"] == RANDOM_INIT
    assert {id(p) for p in masked.seg_head.parameters()} <= {id(p) for p in suffix.parameters()}
    assert split_stage_names(masked, LAST_BLOCK[name])[1][-2:] == ["head", "seg_head"]
    # The frozen prefix is the plain model's, so its cached outputs serve runs with and without a head.
    assert module_hash(prefix) == module_hash(split_model(plain, LAST_BLOCK[name])[0])
    assert "seg_head" not in split_stage_names(plain, LAST_BLOCK[name])[1]


def test_a_step_trains_the_head_and_the_last_block_and_leaves_the_prefix_bit_identical() -> None:
    model = _model(seg_head=True)
    prefix, suffix = freeze_before(model, "denseblock4")
    before = {k: v.clone() for k, v in prefix.state_dict().items()}
    head_before = model.seg_head.conv.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in suffix.parameters() if p.requires_grad], lr=0.1)
    model.train()
    x, y = torch.randn(4, 3, SIDE, SIDE), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        features = prefix(x)
    logits, mask_logits = suffix.forward_with_mask(features)
    (nn.functional.cross_entropy(logits, y) + 0.5 * mask_loss(mask_logits, _target(4))).backward()
    assert model.seg_head.conv.weight.grad.abs().sum() > 0
    assert model.features.denseblock4.denselayer16.conv2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in prefix.parameters())
    optimizer.step()
    assert not torch.equal(model.seg_head.conv.weight, head_before)
    after = prefix.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # BatchNorm statistics included


def test_a_split_that_freezes_the_map_gives_the_head_nothing_to_read() -> None:
    model = _model("resnet18", seg_head=True)
    prefix, suffix = split_model(model, "head")  # layer4 (the map) is in the prefix
    assert not any(m is model.mask_source() for m in suffix.modules())
    with torch.no_grad(), pytest.raises(BreastvisionError, match="make the CNN's last block trainable"):
        suffix.forward_with_mask(prefix(torch.randn(1, 3, SIDE, SIDE)))
    with pytest.raises(BreastvisionError, match="no mask head"):
        _model("resnet18").forward_with_mask(torch.randn(1, 3, SIDE, SIDE))
    with pytest.raises(BreastvisionError, match="bad arguments for model 'efficientnet_lite0'"):
        create_model("efficientnet_lite0", num_classes=2, seg_head=True)  # a timm class: no head of its own


def test_the_loss_compares_map_resolution_logits_at_the_mask_size() -> None:
    logits = torch.randn(2, 1, 2, 2)
    upsampled = at_size(logits, (SIDE, SIDE))
    assert upsampled.shape == (2, 1, SIDE, SIDE) and at_size(upsampled, (SIDE, SIDE)) is upsampled
    assert mask_loss(logits, _target(2)) == mask_loss(upsampled, _target(2))
    assert not torch.equal(mask_loss(logits, _target(2)), mask_loss(logits, ~_target(2)))


def test_weights_files_load_with_or_without_the_head(tmp_path) -> None:
    masked = _model(seg_head=True)
    with_head = tmp_path / "with_head.safetensors"
    save_file(masked.state_dict(), str(with_head))
    plain = create_model("densenet121", num_classes=3, pretrained=str(with_head)).eval()
    assert plain.seg_head is None and "seg_head" not in plain.weights_origin
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), masked(x), rtol=0, atol=0)
    reloaded = create_model("densenet121", num_classes=3, pretrained=str(with_head), seg_head=True)
    assert reloaded.weights_origin["seg_head"].startswith("file: ")
    assert torch.equal(reloaded.seg_head.conv.weight, masked.seg_head.conv.weight)
    without_head = tmp_path / "without_head.safetensors"
    save_file(_model().state_dict(), str(without_head))
    seeded = create_model("densenet121", num_classes=3, pretrained=str(without_head), seg_head=True)
    assert seeded.weights_origin["seg_head"] == RANDOM_INIT  # a new part, as SE blocks are
    assert seeded.weights_origin["backbone"].startswith("file: ")


def test_a_model_file_with_the_head_predicts_as_the_same_weights_without_it(make_model_file) -> None:
    from breastvision.models.bundle import ModelBundle

    bundle = ModelBundle.load(make_model_file("densenet121", input_size=SIDE, seg_head=True))
    model = bundle.build_model()
    assert model.seg_head is not None  # rebuilt from the file's model_kwargs, weights included
    plain = create_model("densenet121", num_classes=3).eval()
    plain.load_state_dict({k: v for k, v in bundle.state_dict.items() if not k.startswith("seg_head.")})
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_a_model_file_with_the_head_exports_without_it(make_model_file, tmp_path) -> None:
    import onnx

    from breastvision.serving.export import export_onnx

    result = export_onnx(make_model_file("resnet18", input_size=SIDE, seg_head=True), tmp_path / "m.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [tuple(d.dim_value for d in o.type.tensor_type.shape.dim)[1:] for o in graph.output] == [(3,)]
    assert not any("seg_head" in init.name for init in graph.initializer)
