"""Agreement with the reference libraries (issue 2, point 3): on torchvision's resnet18 with random weights, the
same layer (``layer4``) and the same targets, our maps correlate with pytorch-grad-cam's (Grad-CAM, Grad-CAM++,
HiResCAM, LayerCAM) and Captum's (Saliency, InputXGradient, IntegratedGradients, LayerGradCam, GuidedBackprop)
at a mean per-image Pearson correlation >= 0.99.

The references are only called here, never copied. pytorch-grad-cam returns maps min-max normalised per image
and resized with OpenCV; Pearson correlation is invariant to that normalisation, so we compare our raw maps.
Its Grad-CAM++ adds 1e-6 to the denominator of ``a_k,ij`` where DESIGN §4 takes the exact closed form, hence a
correlation a little below 1 there.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Saliency,
)
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lightning_saliency.layers import resolve_layer
from lightning_saliency.methods import attribute

IG_STEPS = 16


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of two stacks of maps ``[N, H, W]``."""
    a = a.detach().reshape(a.shape[0], -1).double()
    b = b.detach().reshape(b.shape[0], -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([3, 250, 511, 999])
    target = resolve_layer(model, "layer4", example_input=x[:1])
    ours = attribute(model, x, targets,
                     methods=("gradcam", "gradcam++", "hirescam", "layercam", "gradient", "input_x_gradient",
                              "integrated_gradients", "guided_backprop"),
                     layer=target, ig_steps=IG_STEPS, ig_method="gausslegendre")
    return model, x, targets, ours


@pytest.mark.parametrize(("method", "reference"), [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus),
                                                   ("hirescam", HiResCAM), ("layercam", LayerCAM)])
def test_cam_family_matches_pytorch_grad_cam(setup, method, reference):
    model, x, targets, ours = setup
    ref_model = copy.deepcopy(model)  # pytorch-grad-cam calls .backward(), which fills param.grad
    with reference(model=ref_model, target_layers=[ref_model.layer4]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets]))
    assert theirs.shape == ours[method].shape
    r = pearson(ours[method], theirs)
    assert r.mean() >= 0.99 and r.min() >= 0.98, r


def test_gradcam_matches_captum_layer_gradcam(setup):
    model, x, targets, ours = setup
    theirs = LayerGradCam(model, model.layer4).attribute(x, target=targets, relu_attributions=True)
    theirs = LayerAttribution.interpolate(theirs, (96, 96), interpolate_mode="bilinear").squeeze(1)
    r = pearson(ours["gradcam"], theirs)
    assert r.mean() >= 0.99, r


def test_gradient_methods_match_captum(setup):
    model, x, targets, ours = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that it set requires_grad on the inputs
        saliency = Saliency(model).attribute(x.clone(), target=targets, abs=True).amax(dim=1)
        ixg = InputXGradient(model).attribute(x.clone(), target=targets).sum(dim=1)
        ig = IntegratedGradients(model).attribute(x.clone(), target=targets, n_steps=IG_STEPS,
                                                  method="gausslegendre").sum(dim=1)
        guided = GuidedBackprop(model).attribute(x.clone(), target=targets).abs().amax(dim=1)
    for name, theirs in [("gradient", saliency), ("input_x_gradient", ixg), ("integrated_gradients", ig),
                         ("guided_backprop", guided)]:
        r = pearson(ours[name], theirs)
        assert r.mean() >= 0.99, (name, r)
    # same integration rule and steps: the numbers themselves agree, not only their pattern
    torch.testing.assert_close(ours["integrated_gradients"], ig.float(), atol=1e-5, rtol=1e-3)
