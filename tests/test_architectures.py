"""Issue #11, point 3: real architectures with random weights through ``attribute()`` with ``layer="auto"``.

timm (ResNet-18, ViT-Tiny, DeiT-Tiny, Swin-T, ConvNeXt-Atto, EfficientNet-B0), Hugging Face transformers
(``ViTForImageClassification``, ``ConvNextForImageClassification`` returning a ``ModelOutput``) and torchvision
segmentation (DeepLabV3-MobileNetV3, FCN-ResNet50 returning ``{"out": ...}``). Nothing is downloaded: timm with
``pretrained=False``, transformers from configs built here, torchvision with ``weights=None`` and
``weights_backbone=None``. The real architectures at small inputs (32-64 px: timm's ViTs, DeiT and Swin are
built for that ``img_size``), two to four images each; ``torch.manual_seed(0)`` fixes the random weights.

Each model asserts the layer ``"auto"`` picks (and, for transformers, the token reshape), the maps' shape
``[N, H, W]`` at input resolution, that they are finite, and that at least half of the images get a
non-constant map per method (random weights may legitimately zero a Grad-CAM map; with seed 0 every image's
map is non-constant today, the threshold leaves room for numerics across versions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import timm
import torch
import transformers
from torch import nn
from torchvision.models import segmentation as tv_seg

from lightning_saliency import ProbeSet, SaliencyMonitor, attribute
from lightning_saliency.layers import TokenReshape, resolve_layer, vit_reshape
from tests.monitor_utils import FAST, TupleData


def _hf_vit() -> nn.Module:
    cfg = transformers.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(cfg)


def _hf_convnext() -> nn.Module:
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                      num_labels=5, image_size=64)
    return transformers.ConvNextForImageClassification(cfg)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


def _tv(builder: Callable[..., nn.Module], aux_loss: bool = False) -> Callable[[], nn.Module]:
    return lambda: builder(weights=None, weights_backbone=None, num_classes=3, aux_loss=aux_loss)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    size: int  # input side in pixels
    n: int  # images
    layer: str | tuple[str, ...]  # what layer="auto" picks (the names of several library versions)
    reshape: object  # the reshape it comes with: None, vit_reshape or a TokenReshape's prefix-token count
    task: str = "multiclass"
    output: str = "tensor"  # what the default output= took


CASES = {
    "timm/resnet18": Case(_timm("resnet18"), 64, 4, "layer4", None),
    "timm/vit_tiny_patch16_224": Case(_timm("vit_tiny_patch16_224", img_size=64), 64, 4, "blocks.11.norm1", 1),
    "timm/deit_tiny_patch16_224": Case(_timm("deit_tiny_patch16_224", img_size=64), 64, 4, "blocks.11.norm1", 1),
    "timm/deit_tiny_distilled_patch16_224": Case(_timm("deit_tiny_distilled_patch16_224", img_size=64), 64, 4,
                                                 "blocks.11.norm1", 2),  # class + distillation token
    "timm/swin_tiny_patch4_window7_224": Case(_timm("swin_tiny_patch4_window7_224", img_size=64), 64, 4, "layers",
                                              vit_reshape),  # channels-last stages [N, h, w, C]
    "timm/convnext_atto": Case(_timm("convnext_atto"), 64, 4, "stages", None),
    "timm/efficientnet_b0": Case(_timm("efficientnet_b0"), 64, 4, "bn2", None),  # conv_head + its BN-act
    "hf/ViTForImageClassification": Case(_hf_vit, 32, 4, ("vit.layers.1.layernorm_before",  # transformers 5
                                                          "vit.encoder.layer.1.layernorm_before"),  # 4.x
                                         1, output="key 'logits'"),
    "hf/ConvNextForImageClassification": Case(_hf_convnext, 64, 4, "convnext.encoder.stages.3", None,
                                              output="key 'logits'"),
    # segmentation: the layer feeding the head's last (class-score) convolution, not the class scores themselves
    "tv/deeplabv3_mobilenet_v3_large": Case(_tv(tv_seg.deeplabv3_mobilenet_v3_large), 64, 2, "classifier.3", None,
                                            task="segmentation", output="key 'out'"),
    "tv/fcn_resnet50": Case(_tv(tv_seg.fcn_resnet50), 64, 2, "classifier.3", None, task="segmentation",
                            output="key 'out'"),
}


def _inputs(case: Case) -> torch.Tensor:
    return torch.randn(case.n, 3, case.size, case.size, generator=torch.Generator().manual_seed(1))


def _non_constant(m: torch.Tensor) -> int:
    flat = m.reshape(m.shape[0], -1)
    return int((flat.amax(1) - flat.amin(1) > 0).sum())


@pytest.mark.parametrize("name", list(CASES))
def test_auto_layer_on_a_real_architecture_gives_finite_non_constant_maps(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    x = _inputs(case)
    maps, info = attribute(model, x, methods=("gradcam", "gradient"), layer="auto", return_info=True)
    assert info.layer in ((case.layer,) if isinstance(case.layer, str) else case.layer)
    assert (info.task, info.output) == (case.task, case.output)
    for method, m in maps.items():
        assert m.shape == (case.n, case.size, case.size) and m.dtype == torch.float32, method
        assert torch.isfinite(m).all(), method
        assert _non_constant(m) >= math.ceil(case.n / 2), f"{method}: {_non_constant(m)} of {case.n} non-constant"
    # the reshape layer="auto" comes with folds the layer's output into a [N, C, h, w] grid
    target = resolve_layer(model, "auto", example_input=x[:1])
    if isinstance(case.reshape, int):
        assert isinstance(target.reshape, TokenReshape) and target.reshape.prefix == case.reshape
    else:
        assert target.reshape is case.reshape


@pytest.mark.parametrize("name", ["timm/vit_tiny_patch16_224", "hf/ViTForImageClassification"])
def test_vit_token_reshape_drops_the_class_token_and_keeps_the_patch_grid(name: str) -> None:
    """The grid is the patch grid (64 / 16 = 4 for timm, 32 / 4 = 8 for the HF config), from the token count."""
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    x = _inputs(case)[:1]
    target = resolve_layer(model, "auto", example_input=x)
    seen = []
    handle = target.module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    tokens = seen[0]
    side = {"timm/vit_tiny_patch16_224": 4, "hf/ViTForImageClassification": 8}[name]
    assert tokens.shape[1] == 1 + side * side
    grid = target.reshape(tokens)
    assert grid.shape == (1, tokens.shape[2], side, side)
    # patch token t (after the class token) lands at row t // side, column t % side
    assert torch.equal(grid[0, :, 1, 2], tokens[0, 1 + 1 * side + 2])


def test_auxiliary_segmentation_head_is_not_picked_and_gradcam_alone_works() -> None:
    """With ``aux_loss=True`` the output dict also holds ``"aux"`` from a second head on an earlier stage, which
    runs last: layer="auto" takes the main head's layer (the one ``"out"`` depends on). Before, it took the aux
    head, whose activations ``"out"`` does not depend on, and Grad-CAM alone failed inside autograd."""
    torch.manual_seed(0)
    model = _tv(tv_seg.deeplabv3_mobilenet_v3_large, aux_loss=True)()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps, info = attribute(model, x, methods=("gradcam",), return_info=True)
    assert info.layer == "classifier.3" and info.output == "key 'out'"
    assert torch.isfinite(maps["gradcam"]).all() and _non_constant(maps["gradcam"]) == 2
    # output="aux" explains the auxiliary head: "auto" then picks the layer feeding its last convolution
    maps, info = attribute(model, x, methods=("gradcam",), output="aux", return_info=True)
    assert info.layer == "aux_classifier.3" and _non_constant(maps["gradcam"]) >= 1


def test_a_class_score_map_is_skipped_only_when_nothing_with_parameters_follows_it() -> None:
    """A conv whose output has one channel per class and feeds a linear head is a feature map, not the scores."""
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))  # [N, 4, H, W] scores
    assert resolve_layer(seg, "auto", example_input=torch.rand(1, 3, 8, 8)).name == "1"
    clf = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))  # 4 channels, 4 classes
    assert resolve_layer(clf, "auto", example_input=torch.rand(1, 3, 8, 8)).name == "3"


def test_a_detached_backbone_still_gets_its_last_spatial_layer() -> None:
    """When the explained output depends on no spatial layer (the features are detached before the head), "auto"
    keeps its old choice rather than failing: the maps' health then says they are constant."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x).mean((2, 3)).detach())

    assert resolve_layer(Frozen(), "auto", example_input=torch.rand(1, 3, 8, 8)).name == "body"


class _SlowSGD(TupleData):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_two_epoch_monitor_fit_on_timm_vit_tiny_writes_finite_metrics(tmp_path) -> None:
    """A deep random ViT's tokens are nearly alike (rank collapse), so its Grad-CAM map has one sign over the
    whole grid and is all zero for every image about half the time, depending on the seed (the health record
    then says "constant maps: 8 of 8" and the metrics are null). Seed 1 with SGD at lr 0.01 gives usable maps
    in both audits (seed 2 too; seed 0 does not); the gradient maps are usable for every seed."""
    torch.manual_seed(1)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32)
    module = _SlowSGD(net, n=16, shape=(3, 32, 32), batch_size=8)
    probe = ProbeSet(module.data.tensors[0][:8], module.data.tensors[1][:8])
    monitor = SaliencyMonitor(probe, methods=("gradcam", "gradient"), layer="auto", metrics=("stability", "drift"),
                              dirpath=str(tmp_path / "saliency"), log_images=2)
    trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, default_root_dir=str(tmp_path), **FAST)
    trainer.fit(module)
    report = json.loads((tmp_path / "saliency" / "report.json").read_text())
    assert report["config"]["layer"] == "net.blocks.11.norm1"
    assert [a["epoch"] for a in report["audits"]] == [0, 1]
    for audit in report["audits"]:
        assert audit["errors"] == []
        assert audit["health"] == {"logits": "ok", "gradcam": "ok", "gradient": "ok"}
        for key in ("gradcam/stability", "gradient/stability"):
            assert audit["metrics"][key] is not None and math.isfinite(audit["metrics"][key]), key
    for key in ("gradcam/drift", "gradient/drift"):
        assert math.isfinite(report["audits"][1]["metrics"][key]), key
