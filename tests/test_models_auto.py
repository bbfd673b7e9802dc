"""Acceptance point 4: layer="auto" (and the ViT/Swin reshape) gives non-constant maps on eight torchvision models.

Random weights (weights=None), the smallest inputs each model allows with a final grid larger than 1x1;
vit_b_16 is the real architecture built for 64x64 inputs (4x4 patch grid), plus one run at 224 with batch 1.
"""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

from lightning_saliency.methods.engine import attribute


def _vit(**kwargs) -> torch.nn.Module:
    """torchvision's ViT zero-initialises its head when built without weights, so every logit and every
    gradient is exactly 0; give the head small random weights, as any training step would."""
    model = tvm.vit_b_16(weights=None, **kwargs)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


MODELS = {
    "resnet18": (lambda: tvm.resnet18(weights=None), 64),
    "resnet50": (lambda: tvm.resnet50(weights=None), 64),
    "densenet121": (lambda: tvm.densenet121(weights=None), 64),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(weights=None), 64),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(weights=None), 64),
    "convnext_tiny": (lambda: tvm.convnext_tiny(weights=None), 64),
    "swin_t": (lambda: tvm.swin_t(weights=None), 64),
    "vit_b_16": (lambda: _vit(image_size=64), 64),
}


def _check(maps: dict, n: int, size: int) -> None:
    m = maps["gradcam"]
    assert m.shape == (n, size, size) and m.dtype == torch.float32
    assert torch.isfinite(m).all()
    flat = m.reshape(n, -1)
    assert (flat.amax(1) - flat.amin(1) > 0).all(), "every image's map must be non-constant"


@pytest.mark.parametrize("name", list(MODELS))
def test_auto_layer_gives_non_constant_gradcam_maps(name: str) -> None:
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, size, size)
    _check(attribute(model, x, methods=("gradcam",), layer="auto"), 2, size)


def test_vit_b_16_at_224() -> None:
    torch.manual_seed(0)
    model = _vit()
    x = torch.randn(1, 3, 224, 224)
    _check(attribute(model, x, methods=("gradcam",), layer="auto"), 1, 224)
