"""Discovery: find a shortcut nobody annotated, from one method's maps alone (SpRAy, Lapuschkin et al. 2019).

Spectral Relevance Analysis clusters the saliency maps of each class: a small, tight cluster whose maps all
light up the same odd region is a Clever Hans candidate (the copyright tag of PASCAL VOC's horses). Every
number here is a function of the maps (and of which class each map explains); no image content is read. A
candidate is only a suspect: :func:`lightning_saliency.metrics.causal.confirm` tests it by intervention.

The steps, per class ``c`` (the maps that explain class ``c``; ``n_c`` of them):

1. **Too small.** A class with ``n_c < min_class_size`` (default 6) maps is not clustered; it is listed in
   ``too_small``.
2. **Features.** ``P_i = avgpool_{s×s}(|M_i|) / Σ avgpool(|M_i|)``: the map's mass distribution on an
   ``s × s`` grid (``size``, default 8; adaptive average pooling). An all-zero map stays all zero. The
   clustering reads ``v_i = P_i / ‖P_i‖₂`` (so distances are cosine distances of the pooled maps).
3. **Affinity.** ``k = clamp(round(√n_c), 2, n_c − 1)`` nearest neighbours by Euclidean distance ``d`` of
   the ``v_i``; ``w_ij = exp(−d_ij² / (σ_i σ_j))`` for ``j`` among ``i``'s neighbours, with the self-tuning
   scale ``σ_i`` = the distance to ``i``'s ``k``-th neighbour (Zelnik-Manor & Perona 2004; at least
   ``1e-12``), symmetrised ``W = max(W, Wᵀ)``, zero diagonal.
4. **Embedding.** The normalised Laplacian ``L = I − D^{-1/2} W D^{-1/2}`` (``D`` the degrees, at least
   ``1e-12``), its eigenvalues ``λ_0 ≤ λ_1 ≤ ...`` and eigenvectors from ``torch.linalg.eigh`` (float64).
5. **How many clusters.** ``q = argmax (λ_q − λ_{q−1})``, the eigengap, over ``1 ≤ q ≤ q_max`` with
   ``λ_{q−1} ≤ max_eigenvalue`` (default 0.1): ``q − 1`` small eigenvalues say the graph nearly falls apart
   into ``q`` groups (Cheeger: a small ``λ`` is a cut of small conductance), and the gap after them says
   where the structure ends. ``q_max = min(max_clusters, n_c // min_members)`` (default ``min(6, n_c // 3)``);
   ``q = 1`` (no split) when the first gap wins or ``λ_1 > max_eigenvalue``: a class without cluster
   structure is not split.
6. **Clusters.** k-means (k-means++ seeding, ``n_init`` restarts, the lowest inertia kept) on the rows of the
   first ``q`` eigenvectors, each row scaled to unit length (Ng, Jordan & Weiss 2001), with a private
   ``torch.Generator`` seeded by ``seed``: the same maps give the same clusters, the global RNG is untouched.
7. **Region.** For a cluster ``S`` and the rest of its class ``R``: ``Δ = mean_S P − mean_R P``. The region
   is the 4-connected component containing ``argmax Δ`` of the cells where ``Δ ≥ region_level · max Δ``
   (default 0.5); none when ``max Δ ≤ 0``.
8. **Score.** ``inside = mean_S P(region)`` (the cluster's mass in its region), ``rest_inside =
   mean_R P(region)``, ``area`` = the region's share of the grid; ``score = inside − rest_inside`` (in
   ``[−1, 1]``: how much more of its mass the cluster puts there than the rest of the class).
9. **Candidate.** A cluster with ``|S| ≥ min_members`` (3), ``|S| ≤ max_share · n_c`` (0.6: a minority),
   a region with ``area ≤ max_area`` (0.25: compact), ``score ≥ min_score`` (0.15) and
   ``rest_inside ≤ max_rest_ratio · inside`` (0.2: the rest of the class does not use the region; a
   cluster that merely holds the class's object a little off-centre shares its region with the rest of the
   class, at ratios of 0.3 to 0.6 on the discovery example, where the planted watermark's clusters are at
   0.05 to 0.15).

The region is reported in input pixels: ``mask`` ``[H, W]`` (the region's cells upsampled, nearest) and its
bounding box ``region = [top, left, bottom, right]`` (bottom and right exclusive).

Example:
    >>> maps = torch.zeros(12, 16, 16)
    >>> maps[:, 6:10, 6:10] = 1.0          # every map lights up the centre ...
    >>> maps[:4, 6:10, 6:10] = 0.0
    >>> maps[:4, 0:4, 0:4] = 1.0           # ... except four, which light up a corner
    >>> found = discover(maps, torch.zeros(12, dtype=torch.long))
    >>> [(c["class"], c["members"], c["region"]) for c in found["candidates"]]
    [(0, [0, 1, 2, 3], [0, 0, 4, 4])]
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import _check_maps, _generator, _row_blocks

__all__ = ["discover", "spectral_clusters"]


def _features(maps: Tensor, size: int) -> Tensor:
    """``P_i``: each map's mass distribution on the ``size × size`` grid, ``[n, size, size]`` float64."""
    pooled = F.adaptive_avg_pool2d(maps.abs().unsqueeze(1), (size, size)).squeeze(1).double()
    total = pooled.sum(dim=(1, 2), keepdim=True)
    return torch.where(total > 0, pooled / total.clamp_min(1e-300), torch.zeros_like(pooled))


def _affinity(v: Tensor, k: int) -> Tensor:
    n = v.shape[0]
    d = torch.cdist(v, v)
    d.fill_diagonal_(math.inf)
    nd, ni = d.topk(k, dim=1, largest=False)  # ties keep the lower index (topk on CPU is deterministic)
    sigma = nd[:, -1].clamp_min(1e-12)
    w = torch.zeros(n, n, dtype=v.dtype)
    rows = torch.arange(n).unsqueeze(1).expand_as(ni)
    w[rows, ni] = torch.exp(-(nd**2) / (sigma[rows] * sigma[ni]))
    return torch.maximum(w, w.T)


def _kmeans(x: Tensor, q: int, gen: torch.Generator, n_init: int, iters: int = 100) -> Tensor:
    """k-means++ seeding and Lloyd's iterations, the ``n_init`` restarts run side by side (one batched tensor
    each step); the restart with the lowest inertia wins (the first among equals)."""
    n, d = x.shape
    xs = x.expand(n_init, n, d)
    centres = x[torch.randint(n, (n_init,), generator=gen)].unsqueeze(1)  # [restarts, 1, d]
    for _ in range(1, q):  # k-means++: the next centre drawn with probability ∝ squared distance
        d2 = torch.cdist(xs, centres).min(dim=2).values ** 2
        total = d2.sum(dim=1, keepdim=True)
        p = torch.where(total > 0, d2 / total.clamp_min(1e-300), torch.full_like(d2, 1.0 / n))
        centres = torch.cat([centres, x[torch.multinomial(p.float(), 1, generator=gen)[:, 0]].unsqueeze(1)], 1)
    labels = torch.cdist(xs, centres).argmin(dim=2)
    done = torch.zeros(n_init, dtype=torch.bool)
    for _ in range(iters):  # a restart whose labels no longer change is frozen (its centres are their means)
        onehot = F.one_hot(labels, q).to(x.dtype)
        counts = onehot.sum(dim=1).unsqueeze(2)
        means = torch.where(counts > 0, onehot.transpose(1, 2) @ x / counts.clamp_min(1), centres)
        centres = torch.where(done[:, None, None], centres, means)
        new = torch.where(done[:, None], labels, torch.cdist(xs, centres).argmin(dim=2))
        done |= (new == labels).all(dim=1)
        labels = new
        if bool(done.all()):
            break
    inertia = ((xs - centres.gather(1, labels.unsqueeze(2).expand(n_init, n, d))) ** 2).sum(dim=(1, 2)).tolist()
    best = 0
    for i, value in enumerate(inertia):
        if value < inertia[best] - 1e-12:
            best = i
    # name clusters by their first member, so the labels do not depend on which restart won
    order = {int(lab): i for i, lab in enumerate(dict.fromkeys(labels[best].tolist()))}
    return torch.tensor([order[int(lab)] for lab in labels[best]])


def spectral_clusters(features: Tensor, *, min_members: int = 3, max_clusters: int = 6, max_eigenvalue: float = 0.1,
                      seed: int = 0, n_init: int = 10) -> dict[str, Any]:
    """Spectral clustering of ``[n, d]`` feature rows (steps 3-6 of the module docstring).

    Returns ``{"labels": LongTensor [n] (clusters numbered by first appearance), "n_clusters": q,
    "eigenvalues": [min(n, q_max + 1)] float64}``.

    Example:
        >>> f = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
        >>> spectral_clusters(f)["labels"].tolist()
        [0, 0, 0, 0, 1, 1, 1, 1]
    """
    v = features.reshape(features.shape[0], -1).double()
    n = v.shape[0]
    if n < 2:
        return {"labels": torch.zeros(n, dtype=torch.long), "n_clusters": 1, "eigenvalues": torch.zeros(n)}
    norms = v.norm(dim=1, keepdim=True)
    v = torch.where(norms > 0, v / norms.clamp_min(1e-300), v)
    k = int(min(max(round(math.sqrt(n)), 2), n - 1))
    w = _affinity(v, k)
    deg = w.sum(dim=1).clamp_min(1e-12)
    inv = deg.rsqrt()
    lap = torch.eye(n, dtype=w.dtype) - inv[:, None] * w * inv[None, :]
    evals, evecs = torch.linalg.eigh((lap + lap.T) / 2)
    q_max = int(max(1, min(max_clusters, n // max(1, min_members), n - 1)))
    gaps = evals[1 : q_max + 1] - evals[:q_max]
    gaps = torch.where(evals[:q_max] <= max_eigenvalue, gaps, torch.full_like(gaps, -math.inf))
    q = int(gaps.argmax()) + 1 if len(gaps) else 1
    if q == 1:
        labels = torch.zeros(n, dtype=torch.long)
    else:
        emb = evecs[:, :q]
        rn = emb.norm(dim=1, keepdim=True)
        emb = torch.where(rn > 0, emb / rn.clamp_min(1e-300), emb)
        labels = _kmeans(emb, q, _generator(torch.device("cpu"), seed), n_init)
        q = int(labels.max()) + 1
    return {"labels": labels, "n_clusters": q, "eigenvalues": evals[: q_max + 1]}


def _component(cells: Tensor, start: int) -> Tensor:
    """The 4-connected component of the boolean grid ``cells`` [s, s] that contains flat index ``start``."""
    s = cells.shape[-1]
    comp = torch.zeros_like(cells)
    comp.view(-1)[start] = True
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)
    for _ in range(s * s):
        grown = (F.conv2d(comp.float().reshape(1, 1, s, s), kernel, padding=1).reshape(s, s) > 0) & cells
        if torch.equal(grown, comp):
            break
        comp = grown
    return comp


def _region(p_s: Tensor, p_r: Tensor, level: float) -> Tensor | None:
    delta = p_s - p_r
    top = float(delta.max())
    if not top > 0:
        return None
    return _component(delta >= level * top, int(delta.reshape(-1).argmax()))


def _to_pixels(cells: Tensor, h: int, w: int) -> tuple[Tensor, list[int]]:
    mask = F.interpolate(cells.float()[None, None], size=(h, w), mode="nearest")[0, 0] > 0
    ys, xs = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    return mask, [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1]


def discover(
    maps: Tensor,
    classes: Tensor,
    *,
    indices: Tensor | None = None,
    size: int = 8,
    min_class_size: int = 6,
    min_members: int = 3,
    max_share: float = 0.6,
    max_clusters: int = 6,
    max_eigenvalue: float = 0.1,
    region_level: float = 0.5,
    max_area: float = 0.25,
    min_score: float = 0.15,
    max_rest_ratio: float = 0.2,
    seed: int = 0,
    n_init: int = 10,
) -> dict[str, Any]:
    """SpRAy per class: the minority clusters of maps with a compact region of their own (module docstring).

    Args:
        maps: ``[N, H, W]`` maps of one method (signed maps are read by magnitude).
        classes: ``[N]`` the class each map explains (the audit's targets).
        indices: ``[N]`` probe indices reported as ``members`` (default ``0..N-1``).
        size: the pooling grid ``s``; min_class_size, min_members, max_share, max_clusters, max_eigenvalue,
            region_level, max_area, min_score, max_rest_ratio: the thresholds of steps 1-9; seed, n_init: k-means' generator and restarts.

    Returns:
        ``{"candidates": [...], "too_small": [class, ...], "clusters": {class: [cluster per map]},
        "n_clusters": {class: q}}``. Each candidate, best score first: ``{"class", "members"`` (probe indices,
        ascending), ``"region"`` ``[top, left, bottom, right]`` in input pixels, ``"mask"`` BoolTensor
        ``[H, W]``, ``"score", "inside", "rest_inside", "area", "class_size"}``.

    Example:
        >>> found = discover(torch.rand(20, 8, 8), torch.zeros(20, dtype=torch.long), min_class_size=30)
        >>> found["too_small"], found["candidates"]
        ([0], [])
    """
    maps = _check_maps(maps, copy=False)
    classes = torch.as_tensor(classes).reshape(-1).cpu().long()
    n, h, w = maps.shape
    if classes.shape[0] != n:
        raise ValueError(f"discover: {n} maps but {classes.shape[0]} classes; pass the class each map explains")
    indices = torch.arange(n) if indices is None else torch.as_tensor(indices).reshape(-1).cpu().long()
    if indices.shape[0] != n:
        raise ValueError(f"discover: {n} maps but {indices.shape[0]} indices")
    if size < 1 or not 0 < max_share <= 1 or min_members < 1:
        raise ValueError("discover: size >= 1, 0 < max_share <= 1 and min_members >= 1 are required")
    feats = torch.cat([_features(_check_maps(maps[rows]).cpu(), size) for rows in _row_blocks(n, h * w)])
    out: dict[str, Any] = {"candidates": [], "too_small": [], "clusters": {}, "n_clusters": {}}
    for c in sorted(set(classes.tolist())):
        sel = (classes == c).nonzero()[:, 0]
        n_c = len(sel)
        if n_c < min_class_size:
            out["too_small"].append(int(c))
            continue
        fc = feats[sel]
        found = spectral_clusters(fc.reshape(n_c, -1), min_members=min_members, max_clusters=max_clusters,
                                  max_eigenvalue=max_eigenvalue, seed=seed, n_init=n_init)
        labels = found["labels"]
        out["clusters"][int(c)] = labels.tolist()
        out["n_clusters"][int(c)] = found["n_clusters"]
        for j in range(found["n_clusters"]):
            in_s = labels == j
            m = int(in_s.sum())
            if m < min_members or m > max_share * n_c or m == n_c:
                continue
            p_s, p_r = fc[in_s].mean(0), fc[~in_s].mean(0)
            cells = _region(p_s, p_r, region_level)
            if cells is None:
                continue
            area = float(cells.double().mean())
            inside, rest_inside = float(p_s[cells].sum()), float(p_r[cells].sum())
            score = inside - rest_inside
            if area > max_area or score < min_score or rest_inside > max_rest_ratio * inside:
                continue
            mask, box = _to_pixels(cells, h, w)
            out["candidates"].append({
                "class": int(c), "members": sorted(indices[sel[in_s]].tolist()), "region": box, "mask": mask,
                "score": score, "inside": inside, "rest_inside": rest_inside, "area": area, "class_size": n_c,
            })
    out["candidates"].sort(key=lambda cand: -cand["score"])
    return out
