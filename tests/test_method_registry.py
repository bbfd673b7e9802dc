"""The method registry: user methods and new CAM variants run through attribute() like the built-ins."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lightning_saliency
from lightning_saliency.audit import AuditSpec, audit_shard
from lightning_saliency.layers import TargetLayer
from lightning_saliency.maps import resize
from lightning_saliency.methods import attribute, registry
from lightning_saliency.methods.registry import MethodSpec, add_method, register_method, unregister_method
from lightning_saliency.probe import ProbeSet


@pytest.fixture(autouse=True)
def _clean_registry():
    before = registry.method_names()
    yield
    for name in registry.method_names():
        if name not in before:
            unregister_method(name)


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def _signed_x_grad(model, inputs, targets, sxg_scale=1.0):
    """``sxg_scale * sum_c x * dy_t/dx`` (input x gradient summed over channels, signed)."""
    x = inputs.detach().requires_grad_(True)
    score = model(x).gather(1, targets[:, None]).sum()
    (grad,) = torch.autograd.grad(score, [x])
    return sxg_scale * (x.detach() * grad).sum(dim=1)


def test_a_registered_method_runs_by_name_with_its_options_and_matches_its_analytic_map():
    model = _linear()
    x = torch.rand(3, 3, 4, 4)
    targets = torch.tensor([0, 2, 4])
    register_method("sxg", _signed_x_grad, signed=True, options={"sxg_scale": 1.0})
    maps = attribute(model, x, targets, methods=("gradient", "sxg"), sxg_scale=2.0)
    assert list(maps) == ["gradient", "sxg"]
    W = model[1].weight.detach().reshape(5, 3, 4, 4)
    expected = 2.0 * (W[targets] * x).sum(dim=1)  # linear model: dy_t/dx = W[t]
    torch.testing.assert_close(maps["sxg"], expected)
    torch.testing.assert_close(maps["gradient"], W[targets].abs().amax(dim=1))
    # the default option applies when the caller passes none; the flags are the row's
    torch.testing.assert_close(attribute(model, x, targets, methods="sxg")["sxg"], expected / 2)
    assert registry.is_signed("sxg") and "sxg" in registry.SIGNED_METHODS and not registry.needs_layer("sxg")
    assert "sxg" in lightning_saliency.METHODS and "sxg" in registry.method_names()
    assert lightning_saliency.register_method is register_method and lightning_saliency.MethodSpec is MethodSpec


def test_name_and_option_clashes_are_errors_that_say_the_fix():
    with pytest.raises(ValueError, match="'gradcam' is a built-in method: choose another name"):
        register_method("gradcam", _signed_x_grad)
    register_method("sxg", _signed_x_grad)
    with pytest.raises(ValueError, match="already registered.*unregister_method"):
        register_method("sxg", _signed_x_grad)
    with pytest.raises(ValueError, match="'ig_steps' of method 'mine' clashes with 'integrated_gradients'.*mine_"):
        register_method("mine", _signed_x_grad, options={"ig_steps": 3})
    with pytest.raises(ValueError, match="'on_error' .* clashes with 'attribute'"):
        register_method("mine", _signed_x_grad, options={"on_error": "raise"})
    with pytest.raises(ValueError, match="built-in method and cannot be unregistered"):
        unregister_method("occlusion")
    assert "mine" not in registry.method_names()  # a refused row leaves nothing behind
    unregister_method("sxg")
    with pytest.raises(ValueError, match="unknown method 'sxg'"):
        attribute(_linear(), torch.rand(1, 3, 4, 4), methods="sxg")


def test_unknown_options_and_methods_name_the_closest_known_ones():
    register_method("sxg", _signed_x_grad, options={"sxg_scale": 1.0})
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"'sxg_scal': did you mean 'sxg_scale'\?"):
        attribute(_linear(), x, methods="sxg", sxg_scal=2.0)
    with pytest.raises(ValueError, match=r"'ig_step': did you mean 'ig_steps'\?"):
        attribute(_linear(), x, methods="gradient", ig_step=2)
    with pytest.raises(ValueError, match=r"unknown method 'sgx' \(did you mean 'sxg'\?\)"):
        attribute(_linear(), x, methods="sgx")
    with pytest.raises(ValueError, match="on_error must be one of 'raise', 'warn', 'collect'"):
        attribute(_linear(), x, methods="gradient", on_error="ignore")


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _maxgrad_cam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """A CAM variant defined here: ``ReLU(sum_k max_ij G_k,ij * A_k)``."""
    return torch.relu((G.amax(dim=(2, 3), keepdim=True) * A).sum(dim=1))


def test_a_new_cam_variant_is_a_formula_plus_one_row_and_rides_the_shared_pass():
    add_method(MethodSpec("maxgradcam", "cam", _maxgrad_cam, needs_layer=True))
    model = _Conv()
    x = torch.rand(2, 3, 8, 8)
    layer = TargetLayer("features", model.features, None)
    maps, info = attribute(model, x, methods=("gradcam", "maxgradcam", "layercam", "gradient"), layer=layer,
                           return_info=True)
    assert list(maps) == ["gradcam", "maxgradcam", "layercam", "gradient"]
    assert (info.forwards, info.backwards) == (1, 1)  # still one forward and one backward for all four
    # the reference: A and G = dy_t/dA by hand
    acts = {}
    handle = model.features.register_forward_hook(lambda m, a, out: acts.setdefault("A", out))
    logits = model(x)
    handle.remove()
    t = logits.argmax(dim=1)
    (G,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), [acts["A"]])
    torch.testing.assert_close(maps["maxgradcam"], resize(_maxgrad_cam(acts["A"].detach(), G), (8, 8)))
    assert registry.needs_layer("maxgradcam") and not registry.is_signed("maxgradcam")
    # a layer-based row fails with the layer, like the built-ins (collected, not raised, when asked)
    gone = TargetLayer("features.0", nn.Conv2d(3, 4, 1), None)  # not part of the model: never runs
    maps, info = attribute(model, x, methods=("maxgradcam", "gradient"), layer=gone, on_error="collect",
                           return_info=True)
    assert list(maps) == ["gradient"] and "did not run" in str(info.errors["maxgradcam"])


def test_the_guard_restores_everything_a_misbehaving_user_method_changes():
    model = _Conv().train()
    model.head.eval()  # a mixed state must come back as it was, module by module
    seen = {}

    def rude(model, inputs, targets):
        """Leaves train mode on, reseeds every generator, freezes a parameter, turns autograd off."""
        model.train()
        torch.manual_seed(1234)
        random.seed(1234)
        np.random.seed(1234)
        model.features[0].weight.requires_grad_(False)
        torch.set_grad_enabled(False)
        inputs.fill_(0.0)  # its own copy: the methods after it must still see the real inputs
        return torch.ones(inputs.shape[0], *inputs.shape[2:])

    def polite(model, inputs, targets):
        """Records what the method after the rude one sees."""
        seen["training"] = any(m.training for m in model.modules())
        seen["grad"] = torch.is_grad_enabled()
        seen["inputs_sum"] = float(inputs.sum())
        return torch.zeros(inputs.shape[0], *inputs.shape[2:])

    register_method("rude", rude)
    register_method("polite", polite)
    x = torch.rand(2, 3, 8, 8)
    flags = [(m, m.training) for m in model.modules()]
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    with torch.no_grad():
        maps = attribute(model, x, methods=("rude", "polite", "gradient"))
        assert not torch.is_grad_enabled()  # the caller's no_grad is back
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (expected[0].tolist(), *expected[1:])
    assert all(m.training == flag for m, flag in flags)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert seen == {"training": False, "grad": True, "inputs_sum": pytest.approx(float(x.sum()), rel=1e-5)}
    torch.testing.assert_close(maps["rude"], torch.ones(2, 8, 8))
    # a user method that raises: state restored as well, and under "collect" the others come out
    register_method("broken", lambda model, inputs, targets: model.train() and {}["missing"])
    maps, info = attribute(model, x, methods=("broken", "gradient"), on_error="collect", return_info=True)
    assert list(maps) == ["gradient"] and isinstance(info.errors["broken"], KeyError)
    with pytest.raises(KeyError):
        attribute(model, x, methods=("broken", "gradient"))
    assert all(m.training == flag for m, flag in flags)


def test_needs_layer_passes_the_resolved_layer_and_bad_outputs_say_the_fix():
    got = {}

    def layered(model, inputs, targets, *, layer):
        """Records the layer it was given."""
        got["layer"] = layer
        return torch.zeros(inputs.shape[0], *inputs.shape[2:])

    register_method("layered", layered, needs_layer=True)
    model = _Conv()
    maps, info = attribute(model, torch.rand(2, 3, 8, 8), methods="layered", layer="features", return_info=True)
    assert isinstance(got["layer"], TargetLayer) and got["layer"].module is model.features
    assert info.layer == "features" and registry.needs_layer("layered")
    # a method without needs_layer resolves no layer (a model without a spatial layer is fine)
    register_method("sxg", _signed_x_grad)
    _, info = attribute(_linear(), torch.rand(2, 3, 4, 4), methods="sxg", return_info=True)
    assert info.layer is None
    register_method("flat", lambda model, inputs, targets: torch.zeros(inputs.shape[0], 16))
    with pytest.raises(ValueError, match=r"returned \(2, 16\), not a tensor \[N, H, W\] = \(2, 4, 4\)"):
        attribute(_linear(), torch.rand(2, 3, 4, 4), methods="flat")


def test_on_error_warn_collects_and_warns():
    register_method("broken", lambda model, inputs, targets: 1 / 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps, info = attribute(_linear(), torch.rand(1, 3, 4, 4), methods=("broken", "gradient"), on_error="warn",
                               return_info=True)
    assert list(maps) == ["gradient"] and isinstance(info.errors["broken"], ZeroDivisionError)
    assert any("method 'broken' failed (ZeroDivisionError" in str(w.message) for w in caught)


def test_the_audit_runs_a_user_method_and_records_its_exception_type():
    register_method("sxg", _signed_x_grad, signed=True)
    register_method("broken", lambda model, inputs, targets: {}["nope"])
    probe = ProbeSet(torch.rand(3, 3, 4, 4), torch.tensor([0, 1, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "collect" records without a warning
        result = audit_shard(_linear(), probe, AuditSpec(methods=("sxg", "broken"), metrics=("drift",)),
                             on_error="collect")
    with pytest.warns(RuntimeWarning, match="method 'broken' failed \\(KeyError"):
        audit_shard(_linear(), probe, AuditSpec(methods=("sxg", "broken"), metrics=("drift",)), on_error="warn")
    assert tuple(result.maps["sxg"].shape) == (3, 4, 4) and "broken" not in result.maps
    assert [(e["method"], e["type"], e["message"]) for e in result.errors] == [("broken", "KeyError", "'nope'")]


def test_the_monitor_speaks_the_same_on_error_words():
    from lightning_saliency import SaliencyMonitor

    probe = ProbeSet(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))
    for word in ("raise", "warn", "collect"):
        assert SaliencyMonitor(probe, methods=("gradient",), on_error=word).on_error == word
    with pytest.raises(ValueError, match="on_error must be one of 'raise', 'warn', 'collect'"):
        SaliencyMonitor(probe, methods=("gradient",), on_error="ignore")
