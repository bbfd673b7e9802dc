"""Audit metrics over saliency maps: pure functions, no Lightning (DESIGN §4 has the definitions).

Return convention:

* per-image metrics return a float32 tensor ``[N]`` on the inputs' (or maps') device: ``region_mass``,
  ``pointing_game``, ``stability``, ``max_sensitivity``, ``drift``, ``infidelity``, ``completeness_gap``;
  the monitor takes the mean (or the mean per group);
* ``deletion_auc`` / ``insertion_auc`` return ``{"auc": [N], "curve": [N, T+1], "random_auc": [N],
  "random_curve": [N, T+1]}``;
* ``randomization_similarity`` returns ``{"all": [N], "cascading/<unit>" | "independent/<unit>": [N], ...}``;
* ``attention_disparity`` / ``group_divergence`` return a dict of Python numbers with the scalar under
  ``"disparity"`` / ``"divergence"`` and per-group details.

Maps are ``[N, H, W]``; metrics that compare maps read ``|M|`` (signed maps by magnitude). No metric returns
NaN: each undefined case (all-zero map, constant map, a single group, ``y(x) = y(x′)``) returns the documented
defined value and emits :class:`UndefinedMetricWarning`.
"""

from .disparity import attention_disparity, group_divergence
from .faithfulness import completeness_gap, deletion_auc, gaussian_blur, infidelity, insertion_auc
from .localization import pointing_game, region_mass
from .sanity import randomization_similarity
from .stability import (
    UndefinedMetricWarning,
    drift,
    drift_from_ranks,
    map_ranks,
    max_sensitivity,
    pearson,
    rank,
    spearman,
    stability,
)

__all__ = [
    "UndefinedMetricWarning",
    "attention_disparity",
    "completeness_gap",
    "deletion_auc",
    "drift",
    "drift_from_ranks",
    "gaussian_blur",
    "group_divergence",
    "infidelity",
    "insertion_auc",
    "map_ranks",
    "max_sensitivity",
    "pearson",
    "pointing_game",
    "randomization_similarity",
    "rank",
    "region_mass",
    "spearman",
    "stability",
]
