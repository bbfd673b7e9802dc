"""The attribution engine's contracts: one shared pass, batching, targets and contrast, input errors, and no
side effects on the model (issue 2, points 5, 7, 8; DESIGN §5 invariants 1-3)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_saliency.guard import SideEffectGuard
from lightning_saliency.layers import TargetLayer, vit_reshape
from lightning_saliency.methods import attribute, registry
from lightning_saliency.methods import engine as engine_mod
from lightning_saliency.methods.registry import builtin_names

BUNDLE = ("gradcam", "gradcam++", "gradient", "input_x_gradient")
FAST = {"smoothgrad_samples": 2, "ig_steps": 3, "occlusion_patch": 4, "occlusion_stride": 4, "shapley_grid": 2,
        "shapley_permutations": 2, "lime_grid": 2, "lime_samples": 16}


class Net(nn.Module):
    """Small CNN with BatchNorm, Dropout, in-place nn.ReLU and a GAP + linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.features = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.drop(self.features(self.stem(x)).mean(dim=(2, 3))))


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw)


def _x(n=5, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _counting(model):
    """Count model forwards (by batch size) and the backward passes reaching the logits."""
    calls = {"forward": [], "backward": 0}

    def on_grad(grad):
        calls["backward"] += 1

    def hook(module, args, output):
        calls["forward"].append(args[0].shape[0])
        if output.requires_grad:
            output.register_hook(on_grad)

    return calls, model.register_forward_hook(hook)


# ------------------------------------------------------------------------------------------- shared pass


def test_bundle_shares_one_forward_and_one_backward_per_batch(monkeypatch):
    model = _net()
    target = TargetLayer("features", model.features, None)
    grad_calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grad_calls.append(1) or real_grad(*a, **k))
    calls, handle = _counting(model)
    x = _x(5)
    maps, info = attribute(model, x, methods=BUNDLE, layer=target, return_info=True)
    assert calls["forward"] == [5] and calls["backward"] == 1 and len(grad_calls) == 1
    assert (info.forwards, info.backwards) == (1, 1)

    calls["forward"].clear()
    calls["backward"] = 0
    grad_calls.clear()
    chunked, info = attribute(model, x, methods=BUNDLE, layer=target, batch_size=2, return_info=True)
    assert calls["forward"] == [2, 2, 1] and calls["backward"] == 3 and len(grad_calls) == 3
    assert (info.forwards, info.backwards) == (3, 3)
    for name in BUNDLE:
        torch.testing.assert_close(chunked[name], maps[name], atol=1e-5, rtol=1e-4)

    # a layer given by name costs one extra single-image forward (resolution), no extra full-batch pass
    calls["forward"].clear()
    attribute(model, x, methods=BUNDLE, layer="features")
    assert calls["forward"].count(5) == 1 and set(calls["forward"]) <= {1, 5}
    handle.remove()


def test_cam_family_alone_backpropagates_only_to_the_target_layer():
    model = _net()
    reached, recorded = [], []

    def watch(module, args, out):
        recorded.append(out.requires_grad)
        if out.requires_grad:
            out.register_hook(lambda grad: reached.append(1))

    model.stem.register_forward_hook(watch)
    target = TargetLayer("features", model.features, None)
    maps = attribute(model, _x(2), methods=("gradcam", "gradcam++", "hirescam", "layercam"), layer=target)
    assert recorded == [False] and reached == []  # nothing before the layer recorded, nothing back-propagated
    both = attribute(model, _x(2), methods=("gradcam", "gradcam++", "hirescam", "layercam", "gradient"),
                     layer=target)
    assert recorded == [False, True] and reached == [1]
    for name in maps:  # the same maps either way
        torch.testing.assert_close(maps[name], both[name])


def test_multi_pass_methods_batch_rows_and_do_not_depend_on_batch_size():
    model = _net()
    x = _x(3)
    opts = {"smoothgrad_samples": 4, "ig_steps": 5, "occlusion_patch": 8, "occlusion_stride": 8}
    methods = ("smoothgrad", "integrated_gradients", "occlusion", "guided_backprop")
    calls, handle = _counting(model)
    full, info = attribute(model, x, methods=methods, return_info=True, **opts)
    # shared forward (3) + smoothgrad 12 rows + IG 15 rows + guided 3 rows + occlusion 12 rows, 32 rows a pass
    assert calls["forward"] == [3, 12, 15, 3, 12]
    calls["forward"].clear()
    small = attribute(model, x, methods=methods, batch_size=5, **opts)
    assert max(calls["forward"]) == 5 and sum(calls["forward"]) == 3 + 12 + 15 + 12 + 3
    for name in methods:
        torch.testing.assert_close(small[name], full[name], atol=1e-5, rtol=1e-4)
    handle.remove()


# ------------------------------------------------------------------------------------------- targets


def test_targets_none_explains_the_prediction():
    model = _net()
    x = _x(4)
    maps, info = attribute(model, x, methods=("gradcam", "gradient"), layer="features", return_info=True)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    assert torch.equal(info.targets, pred) and torch.equal(info.predictions, pred)
    explicit = attribute(model, x, pred, methods=("gradcam", "gradient"), layer="features")
    for name in maps:
        torch.testing.assert_close(maps[name], explicit[name])


def test_contrast_explains_the_difference_of_two_scores():
    model = _net()
    x = _x(3)
    p, q = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 4])
    maps, info = attribute(model, x, p, methods=("gradcam", "gradient"), layer="features", contrast=q,
                           return_info=True)
    with torch.no_grad():
        logits = model.eval()(x)
    torch.testing.assert_close(info.scores, logits[torch.arange(3), p] - logits[torch.arange(3), q])
    # the gradient of y^P - y^Q is the difference of the two gradients
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    gp = torch.autograd.grad(out[torch.arange(3), p].sum(), xg, retain_graph=True)[0]
    gq = torch.autograd.grad(out[torch.arange(3), q].sum(), xg)[0]
    torch.testing.assert_close(maps["gradient"], (gp - gq).abs().amax(1), atol=1e-6, rtol=1e-5)
    # a class contrasted with itself has nothing to explain
    same = attribute(model, x, p, methods=("gradcam", "gradient", "occlusion"), layer="features", contrast=p,
                     occlusion_patch=8, occlusion_stride=8)
    for name, m in same.items():
        assert m.abs().max() == 0, name


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inputs": torch.zeros(3, 16, 16)}, r"\[N, C, H, W\].*unsqueeze\(0\)"),
        ({"inputs": torch.zeros(2, 3, 16)}, r"\[N, C, H, W\]"),
        ({"inputs": torch.zeros(0, 3, 16, 16)}, "empty"),
        ({"inputs": torch.zeros(2, 3, 16, 16, dtype=torch.long)}, r"float\(\)"),
        ({"inputs": [[1.0]]}, r"\[N, C, H, W\]"),
        ({"targets": torch.tensor([0, 5])}, r"targets\[1\] = 5 is out of range \[0, 5\)"),
        ({"targets": torch.tensor([-1, 0])}, r"out of range \[0, 5\)"),
        ({"targets": 7}, r"out of range \[0, 5\)"),
        ({"contrast": torch.tensor([0, 9])}, r"contrast\[1\] = 9 is out of range"),
        ({"targets": torch.tensor([0, 1, 2])}, r"one class index per image: expected shape \[2\]"),
        ({"targets": torch.tensor([0.0, 1.0])}, r"integer class indices.*\.long\(\)"),
        ({"methods": ("gradcam", "gradcamm")}, r"unknown method 'gradcamm' \(did you mean 'gradcam'\?\); "
                                               r"known methods: cam, gradcam, gradcam\+\+"),
        ({"methods": ()}, "methods is empty"),
        ({"ig_stepz": 3}, r"unknown option.*ig_steps"),
        ({"ig_steps": 0}, "ig_steps must be a positive int"),
        ({"occlusion_patch": (2, 0)}, "occlusion_patch must be"),
        ({"ig_method": "simpson"}, "gausslegendre"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"methods": "occlusion", "occlusion_patch": 32}, "larger than the image side"),
        ({"methods": "integrated_gradients", "ig_baseline": torch.zeros(4, 1, 1)}, "does not broadcast"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    args = {"model": _net(), "inputs": _x(2), "methods": ("gradcam",), "layer": "features", **kwargs}
    with pytest.raises(ValueError, match=match):
        attribute(**args)


def test_model_whose_output_holds_no_logits_is_a_clear_error_naming_output():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return {"scores": self.net(x), "aux": x.mean()}

    with pytest.raises(ValueError, match=r"keys \['scores', 'aux'\].*output="):
        attribute(Dict(), _x(2), methods="gradient")


def test_on_error_collect_keeps_the_methods_that_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    maps, info = attribute(model, _x(2), methods=("cam", "gradcam", "gradient"), layer="1", on_error="collect",
                           return_info=True)
    assert list(maps) == ["gradcam", "gradient"]
    assert "cam" in info.errors and isinstance(info.errors["cam"], ValueError)
    assert "gradcam" in str(info.errors["cam"])
    with pytest.raises(ValueError, match="gradcam"):
        attribute(model, _x(2), methods=("cam", "gradcam"), layer="1")
    # nn.ReLU is there, but a model whose forward fails in one method's pass only loses that method
    exploding = Exploding(fail_at=2)  # forward 1: the shared pass; forward 2: guided backprop
    maps, info = attribute(exploding, _x(2), methods=("gradcam", "guided_gradcam", "occlusion"),
                           layer=TargetLayer("features", exploding.features, None), on_error="collect",
                           return_info=True, **FAST)
    assert list(maps) == ["gradcam", "occlusion"]
    assert list(info.errors) == ["guided_gradcam"] and "boom" in str(info.errors["guided_gradcam"])
    assert isinstance(info.errors["guided_gradcam"], BaseException)


# ------------------------------------------------------------------------------------------- side effects


def _snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks)) for m in model.modules()],
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }


def _assert_same(before, after):
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(a is b for a, b in zip(after["grad"], before["grad"]))  # None stays None, tensors the same
    for a, b in zip(after["grad_values"], before["grad_values"]):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(after["params"] + after["buffers"], before["params"] + before["buffers"]):
        assert torch.equal(a, b)
    assert after["hooks"] == before["hooks"]
    assert torch.equal(after["rng"][0], before["rng"][0])
    assert np.array_equal(after["rng"][1], before["rng"][1])
    assert after["rng"][2] == before["rng"][2]


def _prepared_model():
    model = _net().train()
    model.stem[1].eval()  # a frozen BatchNorm: mixed training flags must come back as they were
    model.stem[0].weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # an existing gradient must stay untouched
    model.register_forward_hook(lambda m, a, o: None)
    model.features[0].register_forward_pre_hook(lambda m, a: None)
    model.fc.register_full_backward_hook(lambda m, gi, go: None)
    return model


def test_model_and_global_state_left_exactly_as_found():
    model = _prepared_model()
    x = _x(3)
    x_before = x.clone()
    before = _snapshot(model)
    maps = attribute(model, x, methods=builtin_names(), layer="features", **FAST)
    assert len(maps) == len(builtin_names())
    _assert_same(before, _snapshot(model))
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None


class Exploding(Net):
    """Raises on the ``fail_at``-th forward call."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return super().forward(x)


@pytest.mark.parametrize(("fail_at", "methods"), [
    (1, ("gradcam", "gradient")),                       # inside the shared pass, hooks on the target layer
    (2, ("cam", "gradcam", "guided_backprop")),         # during guided backprop, ReLU hooks registered
    (2, ("gradcam", "integrated_gradients")),           # during the IG pass
    (3, ("smoothgrad", "occlusion")),
])
def test_state_restored_when_a_method_raises_midway(fail_at, methods):
    torch.manual_seed(0)
    model = Exploding(fail_at)
    model.train()
    model.stem[1].eval()
    target = TargetLayer("features", model.features, None)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        attribute(model, _x(2), methods=methods, layer=target, batch_size=4, **FAST)
    _assert_same(before, _snapshot(model))


def test_state_restored_when_guided_backprop_finds_no_relu():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))

    model = Functional().train()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="nn.ReLU"):
        attribute(model, _x(2), methods=("gradcam", "guided_gradcam"), layer="conv")
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("outer", ["inference_mode", "no_grad"])
def test_works_under_outer_inference_mode_and_no_grad(outer):
    model = _net()
    x = _x(3)
    reference = attribute(model, x, methods=builtin_names(), layer="features", **FAST)
    context = torch.inference_mode() if outer == "inference_mode" else torch.no_grad()
    with context:
        inner_x = x.clone()  # an inference tensor under inference_mode
        maps = attribute(model, inner_x, methods=builtin_names(), layer="features", **FAST)
        assert not torch.is_grad_enabled()
    for name in builtin_names():
        assert torch.equal(maps[name], reference[name]), name


def test_deterministic_on_cpu():
    model = _net()
    x = _x(3)
    first = attribute(model, x, methods=builtin_names(), layer="features", **FAST)
    torch.manual_seed(123)  # global RNG state must not matter (SmoothGrad has its own generator)
    second = attribute(model, x, methods=builtin_names(), layer="features", **FAST)
    for name in builtin_names():
        assert torch.equal(first[name], second[name]), name
    other_seed = attribute(model, x, methods="smoothgrad", smoothgrad_seed=1, **FAST)["smoothgrad"]
    assert not torch.equal(other_seed, first["smoothgrad"])


def test_a_part_of_the_probe_explained_with_its_positions_gets_the_whole_probes_maps():
    """SmoothGrad's noise is keyed by each image's position: the second half of a probe explained with
    ``positions`` (as a DDP shard is) gets exactly the whole probe's maps for those images; without them its
    images draw the noise of the first half's (the maps of a plain call are those of images 0..n-1)."""
    from lightning_saliency.probe import ProbeSet

    model, probe = _net(), ProbeSet(_x(6), torch.zeros(6, dtype=torch.long))
    second = probe.shard(1, 2)
    assert second.indices.tolist() == [3, 4, 5]
    opts = dict(methods=("smoothgrad", "gradient"), smoothgrad_samples=3, batch_size=4)
    whole = attribute(model, probe.inputs, **opts)
    part = attribute(model, second.inputs, positions=second.indices, **opts)
    for name in ("smoothgrad", "gradient"):  # other rows share their batches: equal to float rounding
        torch.testing.assert_close(part[name], whole[name][3:], atol=1e-7, rtol=1e-5)
    plain = attribute(model, second.inputs, **opts)["smoothgrad"]
    assert (plain - whole["smoothgrad"][3:]).abs().amax() > 100 * (part["smoothgrad"] - whole["smoothgrad"][3:]).abs().amax()
    assert torch.equal(attribute(model, second.inputs, positions=[0, 1, 2], **opts)["smoothgrad"], plain)


@pytest.mark.parametrize("positions, message", [
    ([0, 1], r"expected shape \[3\]"), (torch.tensor([0.0, 1.0, 2.0]), "integers"), ([0, -1, 2], ">= 0"),
    ("abc", "one position per image")])
def test_bad_positions_are_a_clear_error(positions, message):
    with pytest.raises(ValueError, match=message):
        attribute(_net(), _x(3), methods="smoothgrad", positions=positions, **FAST)


def test_autocast_maps_are_finite_float32_and_report_the_forward_dtype():
    model = _net()
    x = _x(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps, info = attribute(model, x, methods=builtin_names(), layer="features", return_info=True, **FAST)
        _, full = attribute(model, x, methods=("gradcam",), layer="features", return_info=True, autocast=False)
    assert info.forward_dtype == "bfloat16" and full.forward_dtype == "float32"
    for name, m in maps.items():
        assert m.dtype == torch.float32 and torch.isfinite(m).all(), name


def test_activations_protected_from_later_inplace_ops():
    """DenseNet-style: F.relu(inplace=True) on the target layer's output must not change the activations."""

    class InPlaceAfter(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            a = self.features(x)
            return self.fc(F.relu(a, inplace=True).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = InPlaceAfter()
    x = _x(2, size=8)
    maps = attribute(model, x, torch.tensor([1, 3]), methods=("gradcam", "hirescam"), layer="features")
    with torch.no_grad():
        A = model.features(x)  # the layer's own output, negatives included
    g = model.fc.weight.detach()[[1, 3]][:, :, None, None] * (A > 0) / 64.0
    expected = torch.relu((g.mean(dim=(2, 3), keepdim=True) * A).sum(1))
    torch.testing.assert_close(maps["gradcam"], expected, atol=1e-6, rtol=1e-5)
    assert A.min() < 0  # the check is meaningful: the in-place ReLU would have changed A


def test_token_layer_with_reshape():
    class Tokens(nn.Module):
        """Patch embedding to [N, 1 + h*w, D] tokens, a block, class-token head."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.cls = nn.Parameter(torch.zeros(1, 1, 8))
            self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
            t = self.block(t)
            t = t + self.mix(t).mean(dim=1, keepdim=True)  # mixes patch tokens into the class token
            return self.head(t[:, 0])

    torch.manual_seed(0)
    model = Tokens()
    maps = attribute(model, _x(2), methods=("gradcam", "layercam"), layer="block", reshape=vit_reshape)
    for m in maps.values():
        assert m.shape == (2, 16, 16) and torch.isfinite(m).all() and m.std() > 0


def test_guard_restores_on_exception_and_enables_grad():
    model = _net().train()
    with torch.inference_mode():
        with pytest.raises(KeyError):
            with SideEffectGuard(model) as guard:
                assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
                assert not model.training
                guard.add_forward_hook(model.fc, lambda m, a, o: None)
                torch.rand(3)
                raise KeyError("x")
        assert torch.is_inference_mode_enabled()
    assert model.training and len(model.fc._forward_hooks) == 0


def test_the_registry_holds_design_s_methods_with_their_flags():
    design = ("cam", "gradcam", "gradcam++", "hirescam", "layercam", "gradient", "input_x_gradient", "smoothgrad",
              "integrated_gradients", "guided_backprop", "guided_gradcam", "occlusion",  # DESIGN §3
              "shapley", "lime")  # DESIGN §4's patch-grid methods
    assert set(design) <= set(builtin_names())  # a new built-in is one more row: no edit here
    assert engine_mod.METHODS[: len(builtin_names())] == builtin_names() and set(design) <= set(registry.method_names())
    for name in design:
        spec = registry.get_method(name)
        assert spec.builtin and spec.rides in registry.RIDES
        assert callable(spec.fn) and (spec.fn.__doc__ or "").strip(), f"{name}: its fn has no docstring"
        for part in spec.parts:
            registry.get_method(part)
    # the flags the engine and the metrics rely on
    assert {n for n in design if registry.needs_layer(n)} == {"cam", "gradcam", "gradcam++", "hirescam",
                                                               "layercam", "guided_gradcam"}
    assert {n for n in design if registry.is_signed(n)} == {"input_x_gradient", "integrated_gradients", "shapley", "lime"}
    assert {n for n in design if registry.get_method(n).rides == "own"} == {
        "smoothgrad", "integrated_gradients", "guided_backprop", "occlusion", "shapley", "lime"}
    # every option has one owner, and the flat names of the engine's options are still accepted
    owners = [registry.option_owner(k) for k in registry.all_options()]
    assert None not in owners
    assert {"smoothgrad_samples", "ig_steps", "ig_method", "occlusion_patch", "on_error"} <= set(
        engine_mod.default_options())


def test_compiled_model_is_explained_through_its_original_module():
    model = _net()
    x = _x(2)
    compiled = torch.compile(model, backend="eager")
    compiled(x)  # (in train mode: updates BatchNorm statistics, so the reference comes after)
    reference = attribute(model, x, methods=("gradcam", "gradient"), layer="features")
    for layer in ("features", "_orig_mod.features"):
        maps = attribute(compiled, x, methods=("gradcam", "gradient"), layer=layer)
        for name in maps:
            torch.testing.assert_close(maps[name], reference[name])


def test_layer_auto_picks_the_last_spatial_block():
    model = _net()
    maps, info = attribute(model, _x(2), methods=("gradcam", "cam"), return_info=True)
    assert info.layer == "features"
    named = attribute(model, _x(2), methods=("gradcam", "cam"), layer="features")
    for name in maps:
        torch.testing.assert_close(maps[name], named[name])


def test_on_error_collect_when_the_layer_does_not_reach_the_logits():
    class SideBranch(Net):
        def __init__(self):
            super().__init__()
            self.unused = nn.Conv2d(3, 3, 1)  # never called
            self.probe = nn.Conv2d(3, 3, 1)  # called, output discarded

        def forward(self, x):
            self.probe(x)
            return super().forward(x)

    torch.manual_seed(0)
    model = SideBranch()
    for name, message in [("unused", "did not run"), ("probe", "does not depend on layer")]:
        layer = TargetLayer(name, getattr(model, name), None)
        maps, info = attribute(model, _x(2), methods=("gradcam", "guided_gradcam", "gradient"), layer=layer,
                               on_error="collect", return_info=True)
        assert list(maps) == ["gradient"]
        assert set(info.errors) == {"gradcam", "guided_gradcam"}
        assert message in str(info.errors["gradcam"]) and message in str(info.errors["guided_gradcam"])
        assert isinstance(info.errors["gradcam"], ValueError)
        with pytest.raises(ValueError, match=message):
            attribute(model, _x(2), methods=("gradcam", "gradient"), layer=layer)
