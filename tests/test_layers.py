"""Target-layer resolution: auto choice on the eight torchvision models, names, modules, ViT/Swin reshapes, errors."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from lightning_saliency.layers import TargetLayer, TokenReshape, resolve_layer, vit_reshape


def _activation(model: nn.Module, target: TargetLayer, x: torch.Tensor) -> torch.Tensor:
    """The target layer's output for ``x``, through its reshape."""
    seen = []
    handle = target.module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    out = seen[-1]
    return target.reshape(out) if target.reshape is not None else out


# name -> (builder, input size, expected layer, expected reshape kind)
CASES = {
    "resnet18": (lambda: tvm.resnet18(weights=None), 64, "layer4", None),
    "resnet50": (lambda: tvm.resnet50(weights=None), 64, "layer4", None),
    "densenet121": (lambda: tvm.densenet121(weights=None), 64, "features", None),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(weights=None), 64, "features", None),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(weights=None), 64, "features", None),
    "convnext_tiny": (lambda: tvm.convnext_tiny(weights=None), 64, "features", None),
    "swin_t": (lambda: tvm.swin_t(weights=None), 64, "features", "channels_last"),
    # the real vit_b_16 architecture with a 2x2 patch grid (image_size=32); the 224 case is tested below
    "vit_b_16": (
        lambda: tvm.vit_b_16(weights=None, image_size=32),
        32,
        "encoder.layers.encoder_layer_11.ln_1",
        "tokens",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_auto_picks_the_expected_layer_with_a_spatial_4d_activation(name: str) -> None:
    build, size, expected, kind = CASES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, size, size)
    target = resolve_layer(model, "auto", example_input=x)
    assert target.name == expected
    assert target.module is dict(model.named_modules())[expected]
    if kind is None:
        assert target.reshape is None
    elif kind == "channels_last":
        assert target.reshape is vit_reshape
    else:
        assert isinstance(target.reshape, TokenReshape) and target.reshape.prefix == 1
    act = _activation(model, target, x)
    assert act.ndim == 4 and act.shape[0] == 2
    assert act.shape[2] > 1 and act.shape[3] > 1
    if name == "vit_b_16":
        assert tuple(act.shape) == (2, 768, 2, 2)
    if name == "swin_t":
        assert tuple(act.shape) == (2, 768, 2, 2)


def test_vit_b_16_at_224_uses_a_14x14_grid_from_the_token_count() -> None:
    torch.manual_seed(0)
    model = tvm.vit_b_16(weights=None)
    x = torch.randn(1, 3, 224, 224)
    target = resolve_layer(model, example_input=x)
    assert target.name == "encoder.layers.encoder_layer_11.ln_1"
    act = _activation(model, target, x)
    assert tuple(act.shape) == (1, 768, 14, 14)


def test_auto_without_example_input_builds_a_dummy_from_the_model() -> None:
    # resnet: channels from the first Conv2d, 224x224 -> layer4 is 7x7
    assert resolve_layer(tvm.resnet18(weights=None)).name == "layer4"
    # torchvision ViT: the dummy takes the model's own image_size
    vit = tvm.vit_b_16(weights=None, image_size=48)
    target = resolve_layer(vit)
    assert target.name == "encoder.layers.encoder_layer_11.ln_1"
    assert tuple(_activation(vit, target, torch.randn(1, 3, 48, 48)).shape) == (1, 768, 3, 3)


def test_auto_falls_back_to_the_last_layer_that_still_has_spatial_extent() -> None:
    model = tvm.resnet18(weights=None)
    # at 32x32 layer4 is 1x1, layer3 2x2
    target = resolve_layer(model, example_input=torch.randn(1, 3, 32, 32))
    assert target.name == "layer3"


def test_auto_restores_training_flags_hooks_and_rng() -> None:
    model = tvm.mobilenet_v3_small(weights=None)
    model.train()
    model.classifier[2].eval()  # a mixed state must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(2, 3, 64, 64)
    random.seed(3)
    torch.manual_seed(3)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    bn = model.features[0][1]
    running = bn.running_mean.clone()
    resolve_layer(model, example_input=x)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(bn.running_mean, running)  # ran in eval mode: BatchNorm statistics untouched
    assert all(p.grad is None for p in model.parameters())


def test_flat_cnn_extends_the_last_conv_through_bn_and_relu() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    assert resolve_layer(net, example_input=torch.randn(1, 3, 16, 16)).name == "4"


class _FeaturesThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.last_conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.last_conv(self.features(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_a_bare_conv_after_the_last_block_wins() -> None:
    target = resolve_layer(_FeaturesThenConv(), example_input=torch.randn(1, 3, 16, 16))
    assert target.name == "last_conv" and target.reshape is None


# ------------------------------------------------------------------------------- timm-style transformers


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimmViT(nn.Module):
    """timm's layout: patch_embed.proj, class + register tokens, blocks.N.norm1, norm, head on the class token."""

    def __init__(self, dim: int = 16, depth: int = 3, patch: int = 8, registers: int = 4) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1 + registers, dim))
        self.blocks = nn.Sequential(*[_Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return self.head(self.norm(self.blocks(t))[:, 0])


@pytest.mark.parametrize("hw, grid", [((32, 32), (4, 4)), ((32, 64), (4, 8))])
def test_timm_style_vit_last_block_norm1_and_grid_without_prefix_tokens(hw, grid) -> None:
    torch.manual_seed(0)
    model = _TimmViT()
    x = torch.randn(2, 3, *hw)
    target = resolve_layer(model, example_input=x)
    assert target.name == "blocks.2.norm1"
    assert target.reshape.prefix == 5  # class token + 4 registers, read off the patch grid
    seen = []
    handle = target.module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    tokens = seen[0]
    grid_act = target.reshape(tokens)
    assert tuple(grid_act.shape) == (2, 16, *grid)
    # the patch tokens, row-major: grid cell (i, j) is token 5 + i * w + j
    i, j = grid[0] - 1, 1
    assert torch.equal(grid_act[:, :, i, j], tokens[:, 5 + i * grid[1] + j, :])


class _SwinStage(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, h, w, D]
        return x + self.mlp(self.norm(x))


class _TimmSwin(nn.Module):
    """timm's Swin layout: channels-last stages [N, h, w, D], then norm and a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 24, 4, stride=4)
        self.layers = nn.Sequential(_SwinStage(24), _SwinStage(24))
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).permute(0, 2, 3, 1)
        return self.head(self.norm(self.layers(t)).mean(dim=(1, 2)))


def test_timm_style_channels_last_stages_are_permuted() -> None:
    model = _TimmSwin()
    x = torch.randn(2, 3, 32, 48)
    target = resolve_layer(model, example_input=x)
    assert target.name == "layers" and target.reshape is vit_reshape
    act = _activation(model, target, x)
    assert tuple(act.shape) == (2, 24, 8, 12)


# ------------------------------------------------------------------------------- names and modules


def test_dotted_names_indices_and_modules() -> None:
    model = tvm.resnet18(weights=None)
    x = torch.randn(1, 3, 64, 64)
    assert resolve_layer(model, "layer4.1", example_input=x).module is model.layer4[1]
    assert resolve_layer(model, "layer4[-1]", example_input=x).name == "layer4.1"
    target = resolve_layer(model, model.layer3, example_input=x)
    assert target.name == "layer3" and target.reshape is None
    # no example_input: a dummy forward still decides the reshape (None for a channels-first layer)
    assert resolve_layer(model, "layer4").reshape is None


def test_a_unique_suffix_finds_a_layer_inside_a_wrapper() -> None:
    class Wrapper(nn.Module):  # e.g. a LightningModule holding the network as self.net
        def __init__(self) -> None:
            super().__init__()
            self.net = tvm.resnet18(weights=None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    wrapper = Wrapper()
    x = torch.randn(1, 3, 64, 64)
    assert resolve_layer(wrapper, "layer4", example_input=x).name == "net.layer4"
    assert resolve_layer(wrapper, example_input=x).name == "net.layer4"


def test_explicit_vit_and_swin_names_get_their_reshape() -> None:
    vit = tvm.vit_b_16(weights=None, image_size=32)
    target = resolve_layer(vit, "encoder.layers.encoder_layer_10", example_input=torch.randn(1, 3, 32, 32))
    assert isinstance(target.reshape, TokenReshape)
    assert tuple(target.reshape(torch.zeros(1, 5, 768)).shape) == (1, 768, 2, 2)
    swin = tvm.swin_t(weights=None)
    assert resolve_layer(swin, "features.7", example_input=torch.randn(1, 3, 64, 64)).reshape is vit_reshape


def test_misspelt_name_lists_the_closest_names() -> None:
    model = tvm.resnet18(weights=None)
    with pytest.raises(ValueError, match="did you mean") as err:
        resolve_layer(model, "layr4")
    assert "'layer4'" in str(err.value)
    with pytest.raises(ValueError, match=r"layer4\.1\.conv2"):
        resolve_layer(model, "layer4.1.conv_2")
    with pytest.raises(ValueError, match="top-level modules"):
        resolve_layer(model, "zzzzzzzzzz")


def test_module_not_in_the_model_and_the_model_itself_are_errors() -> None:
    model = tvm.resnet18(weights=None)
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(model, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="not the model itself"):
        resolve_layer(model, model)


def test_nothing_found_explains_layer_and_reshape() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.ReLU(), nn.Linear(10, 2))
    with pytest.raises(ValueError, match="example_input"):
        resolve_layer(mlp)  # no Conv2d to build a dummy from
    with pytest.raises(ValueError, match="layer=") as err:
        resolve_layer(mlp, example_input=torch.randn(1, 3, 4, 4))
    assert "reshape=" in str(err.value) and "vit_reshape" in str(err.value)


def test_a_failing_forward_asks_for_example_input() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))  # only takes 32x32
    with pytest.raises(ValueError, match="example_input") as err:
        resolve_layer(net)
    assert "224" in str(err.value)
    assert resolve_layer(net, example_input=torch.randn(1, 3, 32, 32)).name == "0"


def test_user_reshape_is_checked_on_the_real_output() -> None:
    vit = tvm.vit_b_16(weights=None, image_size=32)
    x = torch.randn(1, 3, 32, 32)
    name = "encoder.layers.encoder_layer_11.ln_1"
    good = resolve_layer(vit, name, reshape=lambda t: vit_reshape(t, prefix=1), example_input=x)
    assert tuple(good.reshape(torch.zeros(1, 5, 768)).shape) == (1, 768, 2, 2)
    with pytest.raises(ValueError, match=r"must map .* to \[N, C, h, w\]"):
        resolve_layer(vit, name, reshape=lambda t: t, example_input=x)
    # with "auto", a user reshape replaces the found one
    custom = resolve_layer(
        tvm.resnet18(weights=None), reshape=torch.relu, example_input=torch.randn(1, 3, 64, 64)
    )
    assert custom.name == "layer4" and custom.reshape is torch.relu


# ------------------------------------------------------------------------------- vit_reshape


def test_vit_reshape_drops_prefix_tokens_and_folds_row_major() -> None:
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    grid = vit_reshape(tokens)
    assert tuple(grid.shape) == (2, 3, 4, 4)
    assert torch.equal(grid[1, :, 2, 3], tokens[1, 1 + 2 * 4 + 3])
    assert tuple(vit_reshape(torch.zeros(1, 196, 8)).shape) == (1, 8, 14, 14)  # no class token
    assert tuple(vit_reshape(torch.zeros(1, 2 + 49, 8)).shape) == (1, 8, 7, 7)  # class + distillation
    assert tuple(vit_reshape(torch.zeros(1, 1 + 2 * 6, 8), prefix=1, aspect=1 / 3).shape) == (1, 8, 2, 6)
    nhwc = torch.randn(2, 3, 5, 4)
    assert torch.equal(vit_reshape(nhwc), nhwc.permute(0, 3, 1, 2))


def test_vit_reshape_errors_say_to_pass_reshape() -> None:
    with pytest.raises(ValueError, match="reshape="):
        vit_reshape(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="reshape="):
        vit_reshape(torch.zeros(1, 1 + 7, 4), prefix=1)  # 7 tokens: no square


def test_vit_choice_is_where_patch_tokens_still_carry_gradient() -> None:
    """After the last block only the class token reaches the head: the chosen norm's patch tokens get
    gradient, the last block's output patch tokens get exactly none."""
    torch.manual_seed(0)
    model = tvm.vit_b_16(weights=None, image_size=32).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    x = torch.randn(1, 3, 32, 32)
    target = resolve_layer(model, example_input=x)
    last_block = model.encoder.layers[-1]
    outs = {}
    h1 = target.module.register_forward_hook(lambda _m, _i, o: outs.__setitem__("chosen", o))
    h2 = last_block.register_forward_hook(lambda _m, _i, o: outs.__setitem__("last", o))
    logits = model(x)
    h1.remove()
    h2.remove()
    g_chosen, g_last = torch.autograd.grad(logits[0, 3], [outs["chosen"], outs["last"]])
    assert g_chosen[0, 1:].abs().sum(-1).min() > 0  # every patch token
    assert g_last[0, 1:].abs().max() == 0 and g_last[0, 0].abs().max() > 0


def test_auto_restores_flags_hooks_and_rng_when_the_forward_raises() -> None:
    class Breaks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.drop = nn.Dropout(0.5)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.rand(5)  # consumes the RNG before failing
            self.drop(self.conv(x))
            raise RuntimeError("boom in forward")

    model = Breaks().train()
    model.head.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(7)
    torch_state = torch.get_rng_state()
    with pytest.raises(ValueError, match="boom in forward"):
        resolve_layer(model, example_input=x)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(torch.get_rng_state(), torch_state)
