"""Sanity check (Adebayo et al. 2018): does the map depend on the learned weights at all?

:func:`randomization_similarity` re-initialises the weights of a deep copy of the model and measures the
Spearman rank correlation (of ``|M|``, per image) between the maps of the trained model and of the copy.
A method that reflects what the model learned gives low similarity; one that would draw the same picture for
any model (an edge detector, a method dominated by the input) stays near 1.

The trained model is never touched: every re-initialisation happens on the copy, under a forked and seeded
global RNG (so the caller's RNG streams do not move either).

Re-initialisation, per module with parameters of its own: ``reset_parameters()`` where the module has it
(``nn.Linear``, ``nn.Conv2d``, norms, ... BatchNorm running statistics are reset too), otherwise each of its
own parameters is redrawn from a normal with that parameter's mean and standard deviation (std 0.02 when the
parameter is constant). Each unit is seeded from ``seed`` and its index, so the last step of the cascade and
the all-at-once randomisation are the same weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._common import _check_maps, _evaluating, _seeded_global_rng, _targets, spearman

__all__ = ["randomization_similarity"]

ModelExplain = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _default_units(model: nn.Module) -> tuple[list[str], str | None]:
    """Top-level children that hold parameters, from the head (last registered) to the input.

    A wrapper whose parameters all sit in one child (a LightningModule holding ``self.model``) is looked
    through, so the units are that child's children.
    """
    prefix, root = "", model
    while True:
        holders = [(n, c) for n, c in root.named_children() if any(True for _ in c.parameters())]
        if len(holders) == 1 and not any(True for _ in root.parameters(recurse=False)):
            prefix, root = f"{prefix}{holders[0][0]}.", holders[0][1]
            continue
        break
    units = [prefix + n for n, _ in holders]
    own = None
    if any(True for _ in root.parameters(recurse=False)):
        own = prefix[:-1]
        units.append(own)
    return list(reversed(units)), own


def _devices(model: nn.Module) -> list[int]:
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@torch.no_grad()
def _reinit(unit: nn.Module, seed: int, devices: list[int], own_only: bool = False) -> None:
    with _seeded_global_rng(seed, devices):
        for module in [unit] if own_only else unit.modules():
            own = list(module.parameters(recurse=False))
            if not own_only and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                for p in own:
                    std = float(p.float().std()) if p.numel() > 1 else 0.0
                    mean = float(p.float().mean())
                    p.normal_(mean, std if std > 0 else 0.02)
            if not own_only and callable(getattr(module, "reset_running_stats", None)):
                module.reset_running_stats()


def randomization_similarity(
    model: nn.Module,
    explain: ModelExplain,
    inputs: Tensor,
    targets: Tensor | None = None,
    mode: str = "all",
    maps: Tensor | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Spearman between maps of the trained model and of re-initialised copies, per image (low is good).

    Args:
        model: the trained model; only a deep copy is ever modified.
        explain: ``explain(model, inputs, targets) -> maps [N, H, W]``, e.g.
            ``lambda m, x, t: attribute(m, x, t, methods=("gradcam",))["gradcam"]``.
        inputs: ``[N, C, H, W]``; targets: ``[N]``, held fixed for every copy (None: the trained model's
            predicted classes).
        mode: ``"all"`` (one copy with every unit re-initialised: one extra ``explain``),
            ``"cascading"`` (re-initialise units one after another from the head, explaining after each:
            the Adebayo cascade), ``"independent"`` (each unit alone, the rest trained).
        maps: the trained model's maps if already computed; otherwise they are computed on a copy.
        layers: the units (dotted module names, in the order to randomise them); default: the model's
            top-level children that have parameters, from the last registered (the head) to the first
            (a wrapper with a single child holding every parameter is looked through).
        seed: seeds every re-initialisation.

    Returns:
        A dict of ``[N]`` tensors: ``"all"`` always (every unit randomised; for ``"cascading"`` it is the
        last cascade step), plus ``"cascading/<unit>"`` (after randomising up to and including ``<unit>``,
        in cascade order) or ``"independent/<unit>"``. Unit ``""`` (the model itself) stands for the parameters
        registered on the model directly, not its children's. Constant
        maps (e.g. Grad-CAM of a random model is often all zero) follow
        :func:`~lightning_saliency.metrics.stability.spearman`: trained map not constant -> 0.0.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 1))
        >>> edges = lambda m, x, t: (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum(1)
        >>> randomization_similarity(model, edges, torch.rand(2, 3, 8, 8), torch.zeros(2).long())["all"].tolist()
        [1.0, 1.0]
    """
    if mode not in ("all", "cascading", "independent"):
        raise ValueError(f"unknown mode {mode!r}: use 'all', 'cascading' or 'independent'")
    if layers is None:
        names, own_unit = _default_units(model)
    else:
        names, own_unit = list(layers), ""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"randomization_similarity: no module named {missing} in the model")
    if not names:
        raise ValueError("randomization_similarity: the model has no parameters to re-initialise")
    index = {n: i for i, n in enumerate(names)}
    # the unit holding the other units (the model itself, "") stands for its own parameters only
    own_only = {own_unit} if own_unit in names else set()
    devices = _devices(model)

    work = copy.deepcopy(model)
    if targets is None:
        with _evaluating(work):
            targets = _targets(work, inputs, None, None)
    ref = _check_maps(explain(work, inputs, targets) if maps is None else maps)

    def score(m: nn.Module) -> Tensor:
        new = _check_maps(explain(m, inputs, targets)).to(ref.device)
        return spearman(ref, new, _name="randomization_similarity")

    def units_of(m: nn.Module) -> dict[str, nn.Module]:
        mods = dict(m.named_modules())
        return {n: mods[n] for n in names}

    out: dict[str, Tensor] = {}
    if mode == "independent":
        units = units_of(work)
        for n in names:
            saved = {k: v.detach().clone() for k, v in units[n].state_dict().items()}
            _reinit(units[n], seed + index[n], devices, own_only=n in own_only)
            out[f"independent/{n}"] = score(work)
            units[n].load_state_dict(saved)
    if mode == "cascading":
        units = units_of(work)
        for n in names:
            _reinit(units[n], seed + index[n], devices, own_only=n in own_only)
            out[f"cascading/{n}"] = score(work)
        out["all"] = out[f"cascading/{names[-1]}"]
    else:
        units = units_of(work)
        for n in names:
            _reinit(units[n], seed + index[n], devices, own_only=n in own_only)
        out["all"] = score(work)
    return out
