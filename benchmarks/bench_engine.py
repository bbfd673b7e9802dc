"""Speed of the attribution engine against the reference libraries (issue 2, point 6; DESIGN §6).

On the same inputs (torchvision ResNet-18 with random weights, 64 images of 224x224 by default, CPU) it times:

- the floor: one plain forward + backward to the input of the batch (``torch.autograd.grad`` to the input),
- our bundle: ``attribute(methods=("gradcam", "gradcam++", "gradient", "input_x_gradient"))``,
- the peers' bundle: pytorch-grad-cam's GradCAM and GradCAMPlusPlus, then Captum's Saliency and InputXGradient,
  one after another,
- Grad-CAM alone: ours, pytorch-grad-cam's GradCAM and Captum's LayerGradCam (upsampled to the input),

and prints a markdown table: the best seconds of ``--repeats`` rounds, and ratios to the floor taken within each
round (workloads interleaved, so that a change of load on a shared machine hits both sides of a ratio alike),
median over rounds.

Usage::

    python benchmarks/bench_engine.py                       # the DESIGN §6 workload
    python benchmarks/bench_engine.py --images 8 --size 112 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import statistics
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


def measure(work: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall times per workload over ``repeats`` interleaved rounds (each round runs every workload once), after
    ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in work}
    for round_ in range(warmup + repeats):
        for name, fn in work.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def table(times: dict[str, list[float]]) -> str:
    """Markdown table: best seconds per workload, and its ratio to the floor as the median over rounds of the
    ratio within each round (a load change on a shared machine then hits both sides of the ratio alike)."""
    names = list(times)
    floor = times[names[0]]

    def ratio(name: str) -> float:
        return statistics.median(t / f for t, f in zip(times[name], floor))

    lines = ["| workload | best seconds | x floor (median of rounds) |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {min(times[name]):.3f} | {ratio(name):.2f} |" for name in names]

    def rel(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    fastest_peer = min(names[4:6], key=lambda n: statistics.median(times[n]))
    lines += [
        "",
        f"- our bundle / peers' bundle: {rel(names[1], names[2]):.2f} (target <= 0.3)",
        f"- our bundle / floor: {ratio(names[1]):.2f} (target <= 1.2)",
        f"- our Grad-CAM / fastest peer's Grad-CAM ({fastest_peer.split(':')[0]}): "
        f"{rel(names[3], fastest_peer):.2f} (target <= 1.0)",
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
    times = measure(workloads(model, x, targets), args.repeats, args.warmup)
    print(f"ResNet-18 (random weights), {args.images} images of {args.size}x{args.size}, CPU "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}; {args.repeats} timed rounds\n")
    print(table(times))


if __name__ == "__main__":
    main()
