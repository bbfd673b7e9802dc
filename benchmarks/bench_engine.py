"""Speed of the attribution engine against the reference libraries (issue 2, point 6; DESIGN §6).

On the same inputs (torchvision ResNet-18 with random weights, 64 images of 224x224 by default, CPU) it times:

- the floor: one plain forward + backward to the input of the batch (``torch.autograd.grad`` to the input),
- our bundle: ``attribute(methods=("gradcam", "gradcam++", "gradient", "input_x_gradient"))``,
- the peers' bundle: pytorch-grad-cam's GradCAM and GradCAMPlusPlus, then Captum's Saliency and InputXGradient,
  one after another,
- Grad-CAM alone: ours, pytorch-grad-cam's GradCAM and Captum's LayerGradCam (upsampled to the input),

and prints a markdown table of seconds (the best of ``--repeats`` rounds, workloads interleaved so that a
change of machine load hits them all alike) and ratios to the floor.

Usage::

    python benchmarks/bench_engine.py                       # the DESIGN §6 workload
    python benchmarks/bench_engine.py --images 8 --size 112 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from collections.abc import Callable

import torch
import torchvision
from captum.attr import InputXGradient, LayerAttribution, LayerGradCam, Saliency
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lightning_saliency.layers import resolve_layer
from lightning_saliency.methods import attribute

BUNDLE = ("gradcam", "gradcam++", "gradient", "input_x_gradient")


def build(images: int, size: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """ResNet-18 with seeded random weights, inputs and targets."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(images, 3, size, size, generator=g)
    targets = torch.randint(0, 1000, (images,), generator=g)
    return model, x, targets


def workloads(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Name -> a callable doing the work once."""
    rows = torch.arange(len(x))
    layer = resolve_layer(model, "layer4", example_input=x[:1])
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    pgc_gradcam = GradCAM(model=model, target_layers=[model.layer4])
    pgc_gradcampp = GradCAMPlusPlus(model=model, target_layers=[model.layer4])
    saliency, ixg = Saliency(model), InputXGradient(model)
    layer_gradcam = LayerGradCam(model, model.layer4)
    size = tuple(x.shape[-2:])

    def floor() -> object:
        xi = x.detach().clone().requires_grad_(True)
        logits = model(xi)
        return torch.autograd.grad(logits[rows, targets].sum(), [xi])[0]

    def ours_bundle() -> object:
        return attribute(model, x, targets, methods=BUNDLE, layer=layer)

    def peers_bundle() -> object:
        a = pgc_gradcam(input_tensor=x, targets=cam_targets)
        b = pgc_gradcampp(input_tensor=x, targets=cam_targets)
        c = saliency.attribute(x.clone(), target=targets, abs=True)
        d = ixg.attribute(x.clone(), target=targets)
        return a, b, c, d

    def ours_gradcam() -> object:
        return attribute(model, x, targets, methods=("gradcam",), layer=layer)

    def pgc_gradcam_alone() -> object:
        return pgc_gradcam(input_tensor=x, targets=cam_targets)

    def captum_layergradcam() -> object:
        maps = layer_gradcam.attribute(x, target=targets, relu_attributions=True)
        return LayerAttribution.interpolate(maps, size, interpolate_mode="bilinear")

    return {
        "floor: forward + backward to the input": floor,
        "ours: gradcam + gradcam++ + gradient + input_x_gradient": ours_bundle,
        "peers: pytorch-grad-cam GradCAM + GradCAMPlusPlus, Captum Saliency + InputXGradient": peers_bundle,
        "ours: gradcam": ours_gradcam,
        "pytorch-grad-cam: GradCAM": pgc_gradcam_alone,
        "Captum: LayerGradCam (+ upsampling)": captum_layergradcam,
    }


def measure(work: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Best wall time per workload over ``repeats`` interleaved rounds, after ``warmup`` rounds."""
    best = {name: float("inf") for name in work}
    for round_ in range(warmup + repeats):
        for name, fn in work.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                best[name] = min(best[name], elapsed)
    return best


def table(best: dict[str, float]) -> str:
    """The markdown table of seconds and ratios to the floor, plus the two headline ratios."""
    names = list(best)
    floor = best[names[0]]
    lines = ["| workload | seconds | x floor |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {best[name]:.3f} | {best[name] / floor:.2f} |" for name in names]
    ours_bundle, peers_bundle = best[names[1]], best[names[2]]
    ours_gc, fastest_peer = best[names[3]], min(best[names[4]], best[names[5]])
    lines += [
        "",
        f"- our bundle / peers' bundle: {ours_bundle / peers_bundle:.2f} (target <= 0.3)",
        f"- our bundle / floor: {ours_bundle / floor:.2f} (target <= 1.2)",
        f"- our Grad-CAM / fastest peer's Grad-CAM: {ours_gc / fastest_peer:.2f} (target <= 1.0)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # Captum warns that it set requires_grad on the inputs
    model, x, targets = build(args.images, args.size)
    best = measure(workloads(model, x, targets), args.repeats, args.warmup)
    print(f"ResNet-18 (random weights), {args.images} images of {args.size}x{args.size}, CPU "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}; best of {args.repeats} rounds\n")
    print(table(best))


if __name__ == "__main__":
    main()
