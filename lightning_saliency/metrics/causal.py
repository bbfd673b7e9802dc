"""Causal tests of a region: does the model depend on it? Forward passes only.

A map can point at a region the model does not depend on (Adebayo et al. 2022), and a model can lean on a
region the map plays down, so a region is tested by intervention:

* :func:`blurred_fill`: the images with the region's pixels replaced by a blur of the pixels *outside* it
  (normalised convolution ``G*(x·(1−m)) / G*(1−m)`` with the Gaussian of
  :func:`~lightning_saliency.metrics.faithfulness.gaussian_blur`, σ default ``max(1.5, max(H, W)/32)``,
  doubled for pixels farther than the kernel from any outside pixel; a mask that covers the whole image is
  filled with the image's own blur). The fill carries nothing of the region itself.
* :func:`spurious_flip_rate` (sufficiency of known regions, the spurious masks): each image ``i`` (the
  recipient) gets a donor ``d(i)`` drawn uniformly among the images of another class (private generator);
  the swap is ``x_i`` with its own region filled (:func:`blurred_fill`) and then the donor's region pasted in
  place. ``flip_i = 1[argmax f(swap_i) = y_d]``, defined (not NaN) where the recipient was not already
  predicted ``y_d``; ``logit_gain_i = Δ(z_{y_d} − z_{y_i})``, the change of the donor class's margin over the
  recipient's class. The rates are the means over the defined images.
* :func:`spurious_erase_drop` (necessity): per image ``1[f(x_i) = y_i] − 1[f(fill_i) = y_i]``; its mean is the
  accuracy lost when every image's region is filled.
* :func:`confirm`: the same tests for a discovery candidate
  (:func:`~lightning_saliency.metrics.discovery.discover`) of class ``c`` with region ``m``: every image of
  another class not already predicted ``c`` (a recipient; at most ``max_recipients``, default 16, drawn with a
  private generator when there are more) gets ``m`` pasted from one member (members taken in turn);
  ``flip_rate`` is the share predicted ``c`` afterwards, ``logit_gain`` the mean ``Δ(z_c − z_{y_r})``;
  ``erase_accuracy_drop`` the members' accuracy lost when ``m`` is filled (at most ``max_recipients`` members,
  drawn likewise). The null pastes a random region of
  the same shape (``m`` shifted by a random offset that keeps it inside the image, ``null_draws`` per
  recipient (default 1), a private generator) from the same member at the same place: ``null_flip_rate`` and
  ``null_logit_gain``. A second null pastes the same region ``m`` from the class's other images (labels
  ``c``, not members; taken in turn): ``rest_flip_rate`` and ``rest_logit_gain``. It tells a shortcut (what
  the members hold in ``m`` and the rest of the class does not) from the class's own object, which flips
  other images wherever it lies and which any image of the class holds near ``m`` as well. Confirmed when
  ``flip_rate ≥ min_flip`` (0.1) and ``flip_rate ≥ null_ratio · max(null_flip_rate, rest_flip_rate)`` (3;
  a null that cannot be computed, e.g. a class without other images, is left out).

The model runs in eval mode under ``torch.no_grad()`` inside a
:class:`~lightning_saliency.guard.SideEffectGuard` (flags, gradients and RNGs restored); labels are class
indices ``[N]``; masks are boolean ``[N, H, W]`` (or one ``[H, W]`` shared by all images).

Example:
    >>> x = torch.zeros(1, 1, 8, 8); x[0, 0, :, 4:6] = 1.0; x[0, 0, :, 6:] = 9.0
    >>> m = torch.zeros(8, 8, dtype=torch.bool); m[:, 6:] = True      # the region: the two columns of 9
    >>> [round(v, 2) for v in blurred_fill(x, m)[0, 0, 0, 6:].tolist()]  # filled from the 0s and 1s outside
    [0.88, 0.94]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._common import _evaluating, _forward, _generator, _warn
from .faithfulness import _check_inputs, gaussian_blur

__all__ = ["blurred_fill", "confirm", "spurious_erase_drop", "spurious_flip_rate"]


def _masks(masks: Tensor, inputs: Tensor, name: str) -> Tensor:
    m = torch.as_tensor(masks, device=inputs.device)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == 2:
        m = m.expand(inputs.shape[0], *m.shape)
    if m.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise ValueError(f"{name}: masks {tuple(m.shape)} must be [N, H, W] (or [H, W]) for inputs "
                         f"{tuple(inputs.shape)}")
    return m.bool()


def _labels(labels: Tensor, inputs: Tensor, name: str) -> Tensor:
    y = torch.as_tensor(labels, device=inputs.device)
    if y.ndim != 1 or y.shape[0] != inputs.shape[0] or y.is_floating_point():
        raise ValueError(f"{name}: labels must be class indices [N] = [{inputs.shape[0]}], got "
                         f"{tuple(y.shape)} {y.dtype}")
    return y.long()


def blurred_fill(inputs: Tensor, masks: Tensor, sigma: float | None = None) -> Tensor:
    """``inputs`` with the masked pixels replaced by a blur of the unmasked ones (module docstring).

    The blur is computed only at the pixels still to fill (their bounding box: ``gaussian_blur``'s
    ``window``), with exactly the values a blur of the whole image has there.

    Example:
        >>> x = torch.rand(2, 3, 16, 16); m = torch.zeros(2, 16, 16, dtype=torch.bool)
        >>> torch.equal(blurred_fill(x, m), x)
        True
    """
    _check_inputs(inputs, "blurred_fill")
    shared = torch.as_tensor(masks).ndim == 2  # one mask for every image: G*keep is blurred once
    m = _masks(masks, inputs, "blurred_fill")[:1] if shared else _masks(masks, inputs, "blurred_fill")
    h, w = inputs.shape[-2:]
    if not bool(m.any()):
        return inputs.clone()
    s = float(sigma) if sigma is not None else max(1.5, max(h, w) / 32)
    keep = (~m).unsqueeze(1).to(inputs.dtype)  # [N or 1, 1, H, W]
    masked = inputs * keep
    out, todo = inputs.clone(), m.clone()
    while bool(todo.any()) and s <= 2 * max(h, w):
        left_over = todo.any(dim=0)  # the blur is computed at the pixels still to fill only (their box)
        ys, xs = left_over.any(dim=1).nonzero()[:, 0], left_over.any(dim=0).nonzero()[:, 0]
        rows, cols = slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)
        num, den = gaussian_blur(masked, s, (rows, cols)), gaussian_blur(keep, s, (rows, cols))  # G*(x·keep), G*keep
        ok = (den[:, 0] > 1e-3) & todo[:, rows, cols]
        out[:, :, rows, cols] = torch.where(ok.unsqueeze(1), num / den.clamp_min(1e-3), out[:, :, rows, cols])
        todo[:, rows, cols] &= ~ok
        s *= 2
    if bool(todo.any()):  # a mask that covers the whole image: nothing outside to fill from
        out = torch.where(todo.unsqueeze(1), gaussian_blur(inputs, max(h, w) / 8), out)
    return out


def _predict(model: nn.Module, x: Tensor, batch_size: int | None) -> Tensor:
    """The logits on ``x``. A batch of CPU images goes in channels-last memory format, where PyTorch's CPU
    pooling and convolution kernels are the fast ones (twice as fast on the find_shortcut example's CNN; the
    values are the same up to float rounding); a model that cannot take it (a ``.view`` of its activations)
    gets the batch as it came."""
    if x.ndim == 4 and x.device.type == "cpu" and x.shape[1] > 1:
        try:
            return _forward(model, x.contiguous(memory_format=torch.channels_last), batch_size)
        except RuntimeError:
            pass
    return _forward(model, x, batch_size)


def _predict_rows(model: nn.Module, n: int, rows: Callable[[slice], Tensor], batch_size: int | None) -> Tensor:
    """Logits ``[n, K]`` of the ``n`` images that ``rows(chunk)`` builds ``batch_size`` at a time: an edited copy
    of the probe (pasted, swapped, erased) is never held whole."""
    step = batch_size or max(n, 1)
    return torch.cat([_forward(model, rows(slice(i, i + step)), None) for i in range(0, n, step)]) if n \
        else _forward(model, rows(slice(0, 0)), None)


def _donors(labels: Tensor, gen: torch.Generator) -> Tensor:
    donors = torch.full_like(labels, -1)
    for i in range(len(labels)):
        other = (labels != labels[i]).nonzero()[:, 0]
        if len(other):
            donors[i] = other[int(torch.randint(len(other), (1,), generator=gen))]
    return donors


def spurious_flip_rate(model: nn.Module, inputs: Tensor, labels: Tensor, masks: Tensor, *, seed: int = 0,
                       pool: tuple[Tensor, Tensor, Tensor] | None = None, positions: Tensor | None = None,
                       blur_sigma: float | None = None, batch_size: int | None = None) -> dict[str, Tensor]:
    """Swap each image's region with a donor's of another class: ``{"flip": [N], "logit_gain": [N],
    "donor": [N]}`` (module docstring; NaN where undefined, donor ``-1`` where no other class exists).

    ``pool = (inputs, labels, masks)`` of the whole probe draws the donors from it and ``positions`` are the
    rows' places in it (default: the rows themselves): one shard of a probe then gets exactly the donors, and
    so the values, that it gets in the whole probe (the draw is made over the pool, by position). ``donor``
    holds pool positions.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> m = torch.zeros(4, 8, 8, dtype=torch.bool); m[:, :2, :2] = True
        >>> y = torch.tensor([0, 1, 0, 1])
        >>> r = spurious_flip_rate(model, torch.rand(4, 3, 8, 8), y, m)
        >>> bool((y[r["donor"]] != y).all()), r["flip"].shape      # each donor is of the other class
        (True, torch.Size([4]))
    """
    _check_inputs(inputs, "spurious_flip_rate")
    m, y = _masks(masks, inputs, "spurious_flip_rate"), _labels(labels, inputs, "spurious_flip_rate")
    n = inputs.shape[0]
    if pool is None:
        pool_x, pool_y, pool_m, positions = inputs, y, m, torch.arange(n)
    else:
        pool_x, pool_y, pool_m = pool[0], torch.as_tensor(pool[1]).long(), torch.as_tensor(pool[2]).bool()
        positions = torch.arange(n) if positions is None else torch.as_tensor(positions).reshape(-1).cpu()
        if len(positions) != n or (n and not bool((pool_y.cpu()[positions] == y.cpu()).all())):
            raise ValueError("spurious_flip_rate: positions must give each row's place in the pool (same labels)")
    donors = _donors(pool_y.cpu(), _generator(torch.device("cpu"), seed))[positions].to(inputs.device)
    flip, gain = torch.full((n,), math.nan, device=inputs.device), torch.full((n,), math.nan, device=inputs.device)
    has = donors >= 0
    if not bool(has.any()):
        _warn("spurious_flip_rate: every probe image has the same label; there is no donor of another class")
        return {"flip": flip, "logit_gain": gain, "donor": donors}
    r, d = has.nonzero()[:, 0], donors[has]

    def swapped(part: slice) -> Tensor:
        rows, src = r[part], d[part]
        dx = pool_x[src.to(pool_x.device)].to(inputs.device)
        dm = pool_m[src.to(pool_m.device)].to(inputs.device)
        dm = dm[:, 0] if dm.ndim == 4 else dm
        return torch.where(dm.unsqueeze(1), dx, blurred_fill(inputs[rows], m[rows], blur_sigma))

    with _evaluating(model):
        before = _predict_rows(model, len(r), lambda part: inputs[r[part]], batch_size)
        after = _predict_rows(model, len(r), swapped, batch_size)
    yd, yr = pool_y.to(inputs.device)[d], y[r]

    def margin(z: Tensor) -> Tensor:
        return z.gather(1, yd[:, None])[:, 0] - z.gather(1, yr[:, None])[:, 0]

    eligible = before.argmax(1) != yd
    flip[r] = torch.where(eligible, (after.argmax(1) == yd).float(), torch.full_like(flip[r], math.nan))
    gain[r] = margin(after) - margin(before)
    return {"flip": flip, "logit_gain": gain, "donor": donors}


def spurious_erase_drop(model: nn.Module, inputs: Tensor, labels: Tensor, masks: Tensor, *,
                        blur_sigma: float | None = None, batch_size: int | None = None) -> Tensor:
    """Per image ``1[f(x) = y] − 1[f(fill(x)) = y]`` ``[N]``; the mean is the accuracy lost when every image's
    region is replaced by :func:`blurred_fill`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> m = torch.zeros(2, 8, 8, dtype=torch.bool)       # empty regions: nothing is erased
        >>> spurious_erase_drop(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), m).tolist()
        [0.0, 0.0]
    """
    _check_inputs(inputs, "spurious_erase_drop")
    m, y = _masks(masks, inputs, "spurious_erase_drop"), _labels(labels, inputs, "spurious_erase_drop")
    with _evaluating(model):
        before = _predict(model, inputs, batch_size).argmax(1) == y
        after = _predict_rows(model, len(inputs), lambda part: blurred_fill(inputs[part], m[part], blur_sigma),
                              batch_size).argmax(1) == y
    return before.float() - after.float()


def _shifted(mask: Tensor, gen: torch.Generator, k: int) -> Tensor:
    """``k`` copies ``[k, H, W]`` of ``mask`` [H, W] shifted by random offsets that keep its bounding box inside
    (``torch.roll`` of each, made as one gather)."""
    h, w = mask.shape
    ys, xs = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    dy = torch.randint(-top, h - bottom + 1, (k,), generator=gen)
    dx = torch.randint(-left, w - right + 1, (k,), generator=gen)
    rows = (torch.arange(h)[None, :] - dy[:, None]) % h
    cols = (torch.arange(w)[None, :] - dx[:, None]) % w
    return mask[rows[:, :, None], cols[:, None, :]]


def _at_most(rows: Tensor, k: int | None, gen: torch.Generator) -> Tensor:
    """``rows``, or ``k`` of them drawn without replacement (in their order) when there are more."""
    if k is None or len(rows) <= int(k):
        return rows
    return rows[torch.randperm(len(rows), generator=gen)[: int(k)].sort().values.to(rows.device)]


def confirm(model: nn.Module, inputs: Tensor, labels: Tensor, candidate: dict[str, Any], *,
            indices: Tensor | None = None, min_flip: float = 0.1, null_ratio: float = 3.0, null_draws: int = 1,
            max_recipients: int | None = 16, seed: int = 0, logits: Tensor | None = None,
            blur_sigma: float | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Paste a candidate's region onto other classes' images, and erase it from its members (module docstring).

    The pastes, both nulls and the erased members go through the model as one batch (chunked by
    ``batch_size``): with ``logits`` given that is the only forward.

    Args:
        inputs, labels: the probe images ``[N, C, H, W]`` and their labels ``[N]``.
        candidate: a :func:`~lightning_saliency.metrics.discovery.discover` candidate (``class``, ``members``
            as probe indices, ``mask`` ``[H, W]``).
        indices: the probe index of each row of ``inputs`` (default ``0..N-1``).
        min_flip, null_ratio: confirmed when ``flip_rate ≥ min_flip`` and ``flip_rate ≥ null_ratio · null``
            (``null``: the larger of the random-region and the rest-of-class null).
        null_draws: random regions per recipient; seed: their generator (and the recipients' draw).
        max_recipients: at most this many recipients, and members erased, drawn without replacement
            (``None``: every one).
        logits: the model's logits ``[N, K]`` on ``inputs`` when the caller has them (saves one forward).

    Returns:
        the candidate's fields plus ``flip_rate``, ``null_flip_rate``, ``rest_flip_rate``, ``logit_gain``,
        ``null_logit_gain``, ``rest_logit_gain``, ``erase_accuracy_drop``, ``recipients`` (how many images were
        pasted onto) and ``confirmed``; the rates are ``nan`` (and ``confirmed`` False, with ``reason``) when no
        image of another class can flip.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> mask = torch.zeros(8, 8, dtype=torch.bool); mask[:2, :2] = True
        >>> cand = {"class": 0, "members": [0, 1, 2], "mask": mask}
        >>> r = confirm(model, torch.rand(6, 3, 8, 8), torch.tensor([0, 0, 0, 1, 1, 1]), cand)
        >>> sorted(k for k in r if k not in cand)[:3]
        ['confirmed', 'erase_accuracy_drop', 'flip_rate']
    """
    _check_inputs(inputs, "confirm")
    y = _labels(labels, inputs, "confirm")
    n, dev = inputs.shape[0], inputs.device
    indices = torch.arange(n) if indices is None else torch.as_tensor(indices).reshape(-1).cpu()
    where = {int(p): i for i, p in enumerate(indices.tolist())}
    if not len(candidate["members"]):
        raise ValueError("confirm: the candidate has no members; pass a discover() candidate")
    missing = [p for p in candidate["members"] if int(p) not in where]
    if missing:
        raise ValueError(f"confirm: members {missing[:5]} are not among the inputs' indices")
    mask = torch.as_tensor(candidate["mask"]).bool().to(dev)
    if mask.shape != inputs.shape[2:] or not bool(mask.any()):
        raise ValueError(f"confirm: the candidate's mask must be a non-empty [H, W] = {tuple(inputs.shape[2:])}")
    if max_recipients is not None and int(max_recipients) < 1:
        raise ValueError(f"confirm: max_recipients must be >= 1 or None, got {max_recipients}")
    c = int(candidate["class"])
    members = torch.tensor([where[int(p)] for p in candidate["members"]], device=dev)
    gen = _generator(torch.device("cpu"), seed)
    out = dict(candidate)
    nan = dict.fromkeys(("flip_rate", "logit_gain", "null_flip_rate", "null_logit_gain", "rest_flip_rate",
                         "rest_logit_gain"), math.nan)
    with _evaluating(model):
        z = _predict(model, inputs, batch_size) if logits is None else logits.detach().float().to(dev)
        pred = z.argmax(1)
        recipients = ((y != c) & (pred != c)).nonzero()[:, 0]
        recipients, erased = (_at_most(rows, max_recipients, gen) for rows in (recipients, members))
        r = len(recipients)
        member = torch.zeros(n, dtype=torch.bool, device=dev)
        member[members] = True
        rest = ((y == c) & ~member).nonzero()[:, 0]
        # (region [k, H, W], recipient rows [k], source rows [k]) of each paste: the candidate's, the random
        # regions' (draw-major), the rest of the class's; then the members with the region filled
        pastes: list[tuple[Tensor, Tensor, Tensor]] = []
        if r:
            donors = members[torch.arange(r, device=dev) % len(members)]
            pastes.append((mask.expand(r, *mask.shape), recipients, donors))
            pastes.append((_shifted(mask.cpu(), gen, null_draws * r).to(dev), recipients.repeat(null_draws),
                           donors.repeat(null_draws)))  # draw-major: draw j of recipient i at j * r + i
            if len(rest):  # the same region from the class's other images: is it these images' content?
                pastes.append((mask.expand(r, *mask.shape), recipients, rest[torch.arange(r, device=dev) % len(rest)]))
        sizes = [len(rows) for _, rows, _ in pastes] + [len(erased)]
        batch = [blurred_fill(inputs[erased], mask, blur_sigma)]
        if pastes:  # every paste in one gather: region, recipient and source rows concatenated
            region, rows, src = (torch.cat(part) for part in zip(*pastes))
            batch.insert(0, torch.where(region[:, None], inputs[src], inputs[rows]))
        zz = _predict(model, torch.cat(batch), batch_size).split(sizes)
    for (_, rows, _), zp, name in zip(pastes, zz, ("", "null_", "rest_")):
        gain = (zp[:, c] - zp.gather(1, y[rows][:, None])[:, 0]) - (z[rows, c] - z[rows].gather(
            1, y[rows][:, None])[:, 0])
        nan.update({f"{name}flip_rate": float((zp.argmax(1) == c).float().mean()),
                    f"{name}logit_gain": float(gain.mean())})
    out.update(nan)
    if not r:
        out["reason"] = f"no image of another class is predicted other than class {c}: nothing can flip"
    ym = y[erased]
    out["erase_accuracy_drop"] = float((pred[erased] == ym).float().mean() - (zz[-1].argmax(1) == ym).float().mean())
    out["recipients"] = int(r)
    fr = out["flip_rate"]
    null = max(v for v in (out["null_flip_rate"], out["rest_flip_rate"], 0.0) if math.isfinite(v))
    out["confirmed"] = bool(math.isfinite(fr) and fr >= min_flip and fr >= null_ratio * null)
    return out
