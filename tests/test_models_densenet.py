"""DenseNet-121 + SE (paper 000): SE count, placement, parameter cost, near-identity start."""

from __future__ import annotations

import torch
from timm.layers import SEModule

from breastvision.models.registry import create_model

GROWTH = 32
BLOCKS = (6, 12, 24, 16)


def expected_se_channels() -> list[int]:
    """SE after every dense layer (on the block's concatenated output) and every transition."""
    channels, out = 64, []
    for i, layers in enumerate(BLOCKS):
        out += [channels + GROWTH * k for k in range(1, layers + 1)]
        channels += GROWTH * layers
        if i < len(BLOCKS) - 1:
            channels //= 2
            out.append(channels)
    return out


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_call_order() -> list[str]:
    """Each dense layer's last conv, then its SE; each transition's pooling, then its SE."""
    order = []
    for b, layers in enumerate(BLOCKS, start=1):
        for i in range(1, layers + 1):
            order += [f"features.denseblock{b}.denselayer{i}.conv2", f"features.denseblock{b}.se{i}"]
        if b < len(BLOCKS):
            order += [f"features.transition{b}.pool", f"features.transition{b}.se"]
    return order


def test_61_se_blocks_in_paper_order():
    model = create_model("densenet121_se", num_classes=2).eval()
    watched = {
        module: name
        for name, module in model.named_modules()
        if isinstance(module, SEModule) or name.endswith((".conv2", ".pool"))
    }
    calls: list[tuple[str, int]] = []
    hooks = [
        m.register_forward_hook(lambda m, _, out: calls.append((watched[m], out.shape[1]))) for m in watched
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert [name for name, _ in calls] == expected_call_order()
    se_channels = [channels for name, channels in calls if isinstance(model.get_submodule(name), SEModule)]
    assert len(se_channels) == 61 == sum(BLOCKS) + 3
    # On the concatenated output (64 + 32, 64 + 64, ...), not on a layer's 32 new channels.
    assert se_channels == expected_se_channels()


def test_se_parameter_cost():
    plain = n_params(create_model("densenet121", num_classes=2))
    with_se = n_params(create_model("densenet121_se", num_classes=2))
    # Excitation C → C/16 → C with biases, per SE block.
    assert with_se - plain == sum(2 * c * (c // 16) + c // 16 + c for c in expected_se_channels())
    assert 2.95e6 < with_se - plain < 3.05e6


def test_se_blocks_start_near_identity():
    """Same backbone weights with and without SE give nearly the same features (the ImageNet
    check in test_models_pretrained.py shows the same with real weights)."""
    torch.manual_seed(0)
    plain = create_model("densenet121", num_classes=2).eval()
    with_se = create_model("densenet121_se", num_classes=2).eval()
    missing, unexpected = with_se.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".se" in key for key in missing)
    gates: list[torch.Tensor] = []
    for module in with_se.modules():
        if isinstance(module, SEModule):
            module.gate.register_forward_hook(lambda m, _, out: gates.append(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = plain.forward_head(plain.forward_features(x), pre_logits=True)
        b = with_se.forward_head(with_se.forward_features(x), pre_logits=True)
    assert len(gates) == 61
    # A textbook SE block starts at sigmoid(0) = 0.5 on every channel; these start at 1.
    assert max(float((g - 1).abs().max()) for g in gates) < 0.05
    assert (a - b).norm() < 0.05 * a.norm()


def test_dropout_025_before_the_classifier():
    for name in ("densenet121", "densenet121_se"):
        model = create_model(name, num_classes=2)
        assert model.head_drop.p == 0.25
        assert create_model(name, num_classes=2, drop_rate=0.1).head_drop.p == 0.1


def test_se_backbone_init_does_not_depend_on_the_class_count():
    """Transfer stages with different heads (LC25000: 3, BreakHis: 2) share frozen-prefix caches."""
    torch.manual_seed(0)
    two = create_model("densenet121_se", num_classes=2)
    torch.manual_seed(0)
    three = create_model("densenet121_se", num_classes=3)
    backbone_two, backbone_three = two.features.state_dict(), three.features.state_dict()
    assert all(torch.equal(backbone_two[k], backbone_three[k]) for k in backbone_two)
