"""Audit metrics over saliency maps: pure functions, no Lightning (DESIGN §4 has the definitions).

Return convention:

* per-image metrics return a float32 tensor ``[N]`` on the inputs' (or maps') device: ``region_mass``,
  ``pointing_game``, ``stability``, ``max_sensitivity``, ``drift``, ``infidelity``, ``completeness_gap``;
  the monitor takes the mean (or the mean per group);
* ``deletion_auc`` / ``insertion_auc`` return ``{"auc": [N], "curve": [N, T+1], "random_auc": [N],
  "random_curve": [N, T+1]}``;
* ``fragility`` / ``fragility_random`` return ``[N]`` (``fragility_scores`` both at once, with the attacked
  inputs);
* ``randomization_similarity`` returns ``{"all": [N], "cascading/<unit>" | "independent/<unit>": [N], ...}``;
* ``spurious_flip_rate`` returns ``{"flip": [N], "logit_gain": [N], "donor": [N]}`` and
  ``spurious_erase_drop`` ``[N]`` (:mod:`.causal`); ``discover`` (SpRAy, :mod:`.discovery`) returns candidate
  regions of a class's maps and ``confirm`` tests one by pasting it (both dicts of Python values and masks);
* ``attention_disparity`` / ``group_divergence`` return a dict of Python numbers with the scalar under
  ``"disparity"`` / ``"divergence"`` and per-group details;
* ``agreement`` (``shap_agreement``, ``lime_agreement``) returns ``{"value", "tau", "topk", "tau_ceiling",
  "tau_floor", "topk_ceiling", "topk_floor"}``, each ``[N]``, from ``kendall_tau``, ``topk_agreement``,
  ``random_floor`` and ``calibrate`` over cell maps ``[N, cells]``.

Maps are ``[N, H, W]``; metrics that compare maps read ``|M|`` (signed maps by magnitude). No metric returns
NaN: each undefined case (all-zero map, constant map, a single group, ``y(x) = y(x′)``) returns the documented
defined value and emits :class:`UndefinedMetricWarning`. The exceptions are ``fragility`` and the agreement
functions: a constant map has no top-k (and no ranking), and any number would read as a finding, so they give
NaN there (with the warning); an undefined agreement calibration is NaN too. A causal per-image value that does
not apply (``spurious_flip_rate`` of an image already predicted as its donor's class, or with no donor) is NaN,
which the audit leaves out of the mean, as it does images a metric does not score.

The names are imported on first use (``from lightning_saliency.metrics import region_mass`` works as usual), so
that reading the metric registry (:mod:`lightning_saliency.metrics.registry`, torch-free) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    **dict.fromkeys(("agreement", "calibrate", "calibrated_value", "kendall_tau", "random_floor", "topk_agreement"),
                    "agreement"),
    **dict.fromkeys(("attention_disparity", "group_divergence"), "disparity"),
    **dict.fromkeys(("completeness_gap", "deletion_auc", "gaussian_blur", "infidelity", "insertion_auc"),
                    "faithfulness"),
    **dict.fromkeys(("pointing_game", "region_mass"), "localization"),
    "randomization_similarity": "sanity",
    **dict.fromkeys(("fragility", "fragility_random", "fragility_scores"), "fragility"),
    **dict.fromkeys(("drift", "drift_from_ranks", "map_ranks", "max_sensitivity", "stability"), "stability"),
    **dict.fromkeys(("UndefinedMetricWarning", "pearson", "rank", "spearman"), "_common"),
    **dict.fromkeys(("MetricSpec", "register_metric"), "registry"),
    **dict.fromkeys(("blurred_fill", "confirm", "spurious_erase_drop", "spurious_flip_rate"), "causal"),
    **dict.fromkeys(("discover", "spectral_clusters"), "discovery"),
}

__all__ = [
    "MetricSpec",
    "UndefinedMetricWarning",
    "agreement",
    "attention_disparity",
    "blurred_fill",
    "calibrate",
    "calibrated_value",
    "completeness_gap",
    "confirm",
    "deletion_auc",
    "discover",
    "drift",
    "drift_from_ranks",
    "fragility",
    "fragility_random",
    "fragility_scores",
    "gaussian_blur",
    "group_divergence",
    "infidelity",
    "insertion_auc",
    "kendall_tau",
    "map_ranks",
    "max_sensitivity",
    "pearson",
    "pointing_game",
    "random_floor",
    "randomization_similarity",
    "rank",
    "region_mass",
    "register_metric",
    "spearman",
    "spectral_clusters",
    "spurious_erase_drop",
    "spurious_flip_rate",
    "stability",
    "topk_agreement",
]

if TYPE_CHECKING:
    from ._common import UndefinedMetricWarning, pearson, rank, spearman
    from .agreement import agreement, calibrate, calibrated_value, kendall_tau, random_floor, topk_agreement
    from .causal import blurred_fill, confirm, spurious_erase_drop, spurious_flip_rate
    from .discovery import discover, spectral_clusters
    from .disparity import attention_disparity, group_divergence
    from .faithfulness import completeness_gap, deletion_auc, gaussian_blur, infidelity, insertion_auc
    from .fragility import fragility, fragility_random, fragility_scores
    from .localization import pointing_game, region_mass
    from .registry import MetricSpec, register_metric
    from .sanity import randomization_similarity
    from .stability import drift, drift_from_ranks, map_ranks, max_sensitivity, stability


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """Keeps the function ``stability`` from being shadowed by the submodule ``stability`` when that submodule
    is imported (the import system sets it on the package), as the eager ``from .stability import stability``
    used to."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:  # no export is a module
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
