"""Staged freezing: stop a model's stages from learning, BatchNorm statistics included.

In the spirit of Lightning's ``BaseFinetuning``, with one deliberate difference: Lightning freezes
BatchNorm by turning ``track_running_stats`` off, so in train mode a "frozen" BatchNorm normalises
with the *batch's* statistics. Here a frozen module stays in **eval mode** whatever
``model.train()`` says (a forward pre-hook puts it back), so it normalises with its stored running
statistics, which never move. That is what paper 000's "fine-tune mainly by freezing" means for a
pretrained DenseNet, and it makes a frozen prefix a fixed function of its input — the property the
feature cache (``feature_cache``) relies on to give the same result as running the prefix.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

from torch import nn
from torch.utils.hooks import RemovableHandle

#: Per frozen module, the hooks that keep it and every submodule in eval mode.
_HOOKS: weakref.WeakKeyDictionary[nn.Module, list[RemovableHandle]] = weakref.WeakKeyDictionary()


def _keep_eval(module: nn.Module, _args: object) -> None:
    if module.training:
        module.eval()


def _as_list(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


def freeze(modules: nn.Module | Iterable[nn.Module]) -> None:
    """No gradients for the modules' parameters, and eval mode (BatchNorm, dropout) from now on.

    The hook sits on every submodule, not only on the one given: a stage is often a wrapper around
    the model's own layers (``staging.split_model``), and the model's ``forward`` calls the layers
    directly, never the wrapper.
    """
    for module in _as_list(modules):
        for param in module.parameters():
            param.requires_grad_(False)
        module.eval()
        if module not in _HOOKS:
            _HOOKS[module] = [m.register_forward_pre_hook(_keep_eval) for m in module.modules()]


def unfreeze(modules: nn.Module | Iterable[nn.Module]) -> None:
    """Undo :func:`freeze`: parameters learn again and the modules follow ``train()``/``eval()``."""
    for module in _as_list(modules):
        for param in module.parameters():
            param.requires_grad_(True)
        for handle in _HOOKS.pop(module, []):
            handle.remove()


def is_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze` holds ``module`` (all its parameters without gradients, kept in eval)."""
    return module in _HOOKS and not any(p.requires_grad for p in module.parameters())


def freeze_before(
    model: nn.Module, first_trainable_stage: str | Mapping[str, str] | None
) -> tuple[nn.Module, nn.Module]:
    """Freeze every stage of ``model`` before ``first_trainable_stage``; return ``(prefix, suffix)``.

    The stages are those of ``breastvision.models.staging.stages(model)``, or for a fusion one per
    branch (``"cnn.denseblock4,vit.block10"``: both branches' frozen blocks make the prefix);
    ``prefix`` is the frozen part (``nn.Identity`` when nothing is frozen) and ``suffix`` the
    trainable rest, sharing the model's parameters, with ``suffix(prefix(x)) == model(x)``.
    """
    if first_trainable_stage is None:
        return nn.Identity(), model
    from breastvision.models.staging import split_model

    prefix, suffix = split_model(model, first_trainable_stage)
    freeze(prefix)
    return prefix, suffix
