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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import _check_maps, _generator, _one_thread, _row_blocks

__all__ = ["discover", "spectral_clusters"]


def _features(maps: Tensor, size: int) -> Tensor:
    """``P_i``: each map's mass distribution on the ``size × size`` grid, ``[n, size, size]`` float64."""
    pooled = F.adaptive_avg_pool2d(maps.abs().unsqueeze(1), (size, size)).squeeze(1).double()
    total = pooled.sum(dim=(1, 2), keepdim=True)
    return torch.where(total > 0, pooled / total.clamp_min(1e-300), torch.zeros_like(pooled))


def _affinity(v: np.ndarray, k: int) -> np.ndarray:
    n = v.shape[0]
    # distances from the differences themselves (identical rows exactly 0 apart: their ties go by index)
    vt = torch.from_numpy(v)
    d = torch.cdist(vt, vt, compute_mode="donot_use_mm_for_euclid_dist").numpy()
    np.fill_diagonal(d, math.inf)
    ni = np.argsort(d, axis=1, kind="stable")[:, :k]  # ties keep the lower index
    nd = np.take_along_axis(d, ni, axis=1)
    sigma = np.maximum(nd[:, -1], 1e-12)
    w = np.zeros((n, n))
    rows = np.broadcast_to(np.arange(n)[:, None], ni.shape)
    w[rows, ni] = np.exp(-(nd**2) / (sigma[rows] * sigma[ni]))
    return np.maximum(w, w.T)


def _sq_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``[restarts, n, q]``: the squared distance of every row of ``x`` [n, d] to every centre [restarts, q, d]."""
    return ((x[None, :, None, :] - centres[:, None, :, :]) ** 2).sum(axis=3)


def _kmeans(x: np.ndarray, q: int, gen: torch.Generator, n_init: int, iters: int = 100) -> np.ndarray:
    """k-means++ seeding and Lloyd's iterations, the ``n_init`` restarts run side by side (one batched array
    each step; the draws from ``gen``); the restart with the lowest inertia wins (the first among equals)."""
    n, d = x.shape
    centres = x[torch.randint(n, (n_init,), generator=gen).numpy()][:, None, :]  # [restarts, 1, d]
    for _ in range(1, q):  # k-means++: the next centre drawn with probability ∝ squared distance
        d2 = _sq_distances(x, centres).min(axis=2)
        total = d2.sum(axis=1, keepdims=True)
        p = np.where(total > 0, d2 / np.maximum(total, 1e-300), 1.0 / n)
        pick = torch.multinomial(torch.from_numpy(p).float(), 1, generator=gen)[:, 0].numpy()
        centres = np.concatenate([centres, x[pick][:, None, :]], axis=1)
    labels = _sq_distances(x, centres).argmin(axis=2)
    done = np.zeros(n_init, dtype=bool)
    eye = np.eye(q)
    for _ in range(iters):  # a restart whose labels no longer change is frozen (its centres are their means)
        onehot = eye[labels]  # [restarts, n, q]
        counts = onehot.sum(axis=1)[:, :, None]
        sums = (onehot[:, :, :, None] * x[None, :, None, :]).sum(axis=1)  # (no BLAS call: see _spectral)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        centres = np.where(done[:, None, None], centres, means)
        new = np.where(done[:, None], labels, _sq_distances(x, centres).argmin(axis=2))
        done |= (new == labels).all(axis=1)
        labels = new
        if done.all():
            break
    inertia = ((x[None] - np.take_along_axis(centres, labels[:, :, None], axis=1)) ** 2).sum(axis=(1, 2)).tolist()
    best = 0
    for i, value in enumerate(inertia):
        if value < inertia[best] - 1e-12:
            best = i
    # name clusters by their first member, so the labels do not depend on which restart won
    order = {lab: i for i, lab in enumerate(dict.fromkeys(labels[best].tolist()))}
    return np.array([order[lab] for lab in labels[best].tolist()], dtype=np.int64)


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
    v = features.detach().reshape(features.shape[0], -1).cpu().double().numpy()
    with _one_thread():
        labels, q, evals = _spectral(v, min_members, max_clusters, max_eigenvalue, seed, n_init)
    return {"labels": torch.from_numpy(labels), "n_clusters": q, "eigenvalues": torch.from_numpy(evals)}


def _spectral(v: np.ndarray, min_members: int, max_clusters: int, max_eigenvalue: float, seed: int,
              n_init: int) -> tuple[np.ndarray, int, np.ndarray]:
    """:func:`spectral_clusters` on a float64 array: ``(labels [n] int64, q, eigenvalues)``.

    The clustering is a few dozen operations on arrays of a few thousand numbers, done in NumPy, where each
    costs a microsecond rather than torch's several; the distances and the one decomposition are torch's
    (NumPy's LAPACK would start OpenBLAS threads that fight torch's), on one thread (``_one_thread``)."""
    n = v.shape[0]
    if n < 2:
        return np.zeros(n, dtype=np.int64), 1, np.zeros(n)
    norms = np.sqrt((v * v).sum(axis=1, keepdims=True))
    v = np.where(norms > 0, v / np.maximum(norms, 1e-300), v)
    k = int(min(max(round(math.sqrt(n)), 2), n - 1))
    w = _affinity(v, k)
    inv = 1.0 / np.sqrt(np.maximum(w.sum(axis=1), 1e-12))
    lap = np.eye(n) - inv[:, None] * w * inv[None, :]
    evals, evecs = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy((lap + lap.T) / 2)))
    q_max = int(max(1, min(max_clusters, n // max(1, min_members), n - 1)))
    gaps = evals[1 : q_max + 1] - evals[:q_max]
    gaps = np.where(evals[:q_max] <= max_eigenvalue, gaps, -math.inf)
    q = int(gaps.argmax()) + 1 if len(gaps) else 1
    labels = np.zeros(n, dtype=np.int64)
    if q > 1:
        emb = evecs[:, :q]
        rn = np.sqrt((emb * emb).sum(axis=1, keepdims=True))
        emb = np.where(rn > 0, emb / np.maximum(rn, 1e-300), emb)
        labels = _kmeans(emb, q, _generator(torch.device("cpu"), seed), n_init)
        q = int(labels.max()) + 1
    return labels, q, evals[: q_max + 1].copy()


def _component(cells: np.ndarray, start: int) -> np.ndarray:
    """The 4-connected component of the boolean grid ``cells`` [s, s] that contains flat index ``start``."""
    s = cells.shape[-1]
    grid = cells.reshape(-1).tolist()
    seen, todo = {start}, [start]
    while todo:  # a flood fill over at most s² cells
        i = todo.pop()
        y, x = divmod(i, s)
        for j, ok in ((i - s, y > 0), (i + s, y < s - 1), (i - 1, x > 0), (i + 1, x < s - 1)):
            if ok and grid[j] and j not in seen:
                seen.add(j)
                todo.append(j)
    comp = np.zeros(s * s, dtype=bool)
    comp[sorted(seen)] = True
    return comp.reshape(cells.shape)


def _region(p_s: np.ndarray, p_r: np.ndarray, level: float) -> np.ndarray | None:
    delta = p_s - p_r
    top = float(delta.max())
    if not top > 0:
        return None
    return _component(delta >= level * top, int(delta.argmax()))


def _to_pixels(cells: np.ndarray, h: int, w: int) -> tuple[Tensor, list[int]]:
    mask = F.interpolate(torch.from_numpy(cells).float()[None, None], size=(h, w), mode="nearest")[0, 0] > 0
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
    feats_np, classes_np, indices_np = feats.numpy(), classes.numpy(), indices.numpy()
    with _one_thread():  # a few hundred operations on small arrays: a second thread only slows them
        for c in sorted(set(classes_np.tolist())):
            sel = np.flatnonzero(classes_np == c)
            n_c = len(sel)
            if n_c < min_class_size:
                out["too_small"].append(int(c))
                continue
            fc = feats_np[sel]
            labels, q, _ = _spectral(fc.reshape(n_c, -1), min_members, max_clusters, max_eigenvalue, seed, n_init)
            out["clusters"][int(c)] = labels.tolist()
            out["n_clusters"][int(c)] = q
            for j in range(q):
                in_s = labels == j
                m = int(in_s.sum())
                if m < min_members or m > max_share * n_c or m == n_c:
                    continue
                p_s, p_r = fc[in_s].mean(axis=0), fc[~in_s].mean(axis=0)
                cells = _region(p_s, p_r, region_level)
                if cells is None:
                    continue
                area = float(cells.mean())
                inside, rest_inside = float(p_s[cells].sum()), float(p_r[cells].sum())
                score = inside - rest_inside
                if area > max_area or score < min_score or rest_inside > max_rest_ratio * inside:
                    continue
                mask, box = _to_pixels(cells, h, w)
                out["candidates"].append({
                    "class": int(c), "members": sorted(indices_np[sel[in_s]].tolist()), "region": box, "mask": mask,
                    "score": score, "inside": inside, "rest_inside": rest_inside, "area": area, "class_size": n_c,
                })
    out["candidates"].sort(key=lambda cand: -cand["score"])
    return out
