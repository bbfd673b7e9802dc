"""Helpers the metric files share: input checks, the undefined-case warning, ranks and correlations, seeded
generators, and running a model for a metric without a trace.

* :class:`UndefinedMetricWarning` (and ``_warn``): every metric emits it when it returns a defined value for an
  undefined case;
* :func:`rank` (average ranks for ties, batched), :func:`spearman` and :func:`pearson` (per row, with defined
  values for constant rows): what stability, drift, the sanity check and group divergence correlate;
* ``_check_maps``, ``_check_targets``: argument checks with messages that say the fix;
* ``_generator``, ``_seeded_global_rng``: private seeded draws (the global RNG is never moved);
* ``_evaluating``, ``_forward``, ``_targets``: run the model in eval mode under ``no_grad`` and a
  :class:`~lightning_saliency.guard.SideEffectGuard`, as logits ``[N, K]``.

The public names stay importable from :mod:`lightning_saliency.metrics` (and ``metrics.stability``).

Example:
    >>> import torch
    >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 5.0, 9.0]])).tolist()
    [1.0]
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..guard import SideEffectGuard

__all__ = ["UndefinedMetricWarning", "pearson", "rank", "spearman"]


class UndefinedMetricWarning(UserWarning):
    """A metric met an undefined case (all-zero map, constant map, single group, ...) and returned the
    documented defined value instead of NaN."""


def _warn(message: str) -> None:
    warnings.warn(message, UndefinedMetricWarning, stacklevel=3)


def _check_maps(maps: Tensor, name: str = "maps", copy: bool = True) -> Tensor:
    """``maps`` checked to be ``[N, H, W]``, as float32 with NaN and infinities read as 0 (``copy=False``: only
    checked, returned as given, for a caller that converts a block of rows at a time)."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, H, W], got {type(maps).__name__}")
    if maps.ndim != 3:
        raise ValueError(
            f"{name} must have shape [N, H, W] (one map per image), got {tuple(maps.shape)}; "
            "squeeze a channel dimension or stack single maps with torch.stack"
        )
    if not copy:
        return maps.detach()
    return torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)


def _row_blocks(n: int, length: int) -> list[slice]:
    """Slices of ``range(n)`` rows of ``length`` values each, :data:`BLOCK_ELEMENTS` values a block (one empty
    slice when ``n == 0``): the per-image formulas run a block at a time, so their temporaries stay small."""
    step = _block_rows(length)
    return [slice(i, i + step) for i in range(0, n, step)] or [slice(0, 0)]


def rank(x: Tensor) -> Tensor:
    """Ranks ``1..L`` along the last dimension, ties get the average of their ranks (batched, float32).

    NaN has no rank: replace it first (e.g. ``torch.nan_to_num``). On the CPU, float32 rows of up to 2**31
    values are sorted as packed integer keys (see :func:`_sort_keys`), which NumPy sorts with SIMD instructions
    about twice as fast as a ``torch.sort`` that also returns the order; elsewhere ``torch.sort`` is used.

    Example:
        >>> rank(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist()
        [[3.5, 1.0, 3.5, 2.0]]
    """
    shape = x.shape
    length = shape[-1] if x.ndim else 1
    flat = x.reshape(-1, length)
    step = _block_rows(length)
    if flat.shape[0] <= step:
        return _rank_rows(flat).reshape(shape)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    for i in range(0, flat.shape[0], step):  # a block of rows at a time: the sort's temporaries stay a few MiB
        out[i : i + step] = _rank_rows(flat[i : i + step])
    return out.reshape(shape)


#: elements per block of rows that :func:`rank` and :func:`pearson` process at a time (their temporaries are a
#: few int64/float64 copies of one block: about 2 MiB each, whatever the number of maps)
BLOCK_ELEMENTS = 2**18


def _block_rows(length: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(int(length), 1))


def _rank_rows(flat: Tensor) -> Tensor:
    length = flat.shape[-1]
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and length < 2**31 and flat.numel():
        values, order = _sort_keys(flat)
    else:
        values, order = flat.sort(dim=1, stable=True)
    pos = torch.arange(length, device=flat.device).expand_as(order)
    first = torch.ones_like(values, dtype=torch.bool)
    first[:, 1:] = values[:, 1:] != values[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.where(last, pos, torch.full_like(pos, length)).flip(1).cummin(dim=1).values.flip(1)
    avg = (start + end).float() / 2.0 + 1.0
    return torch.empty_like(avg).scatter_(1, order, avg)


def _sort_keys(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Sort the rows of a CPU float32 ``[R, L]`` tensor: ``(keys, order)``, where ``keys`` increase with the
    sorted values (equal keys exactly for equal values) and ``order`` is a stable argsort.

    Each value's IEEE-754 bits become a signed int32 that orders like the float (negative floats have their
    31 lower bits flipped; ``-0.0`` is made ``+0.0`` first), then an int64 ``key << 32 | position``: sorting
    those sorts by value and breaks ties by position, i.e. stably, in one pass over plain integers.
    """
    import numpy as np

    a = np.ascontiguousarray((flat + 0.0).numpy())  # + 0.0 turns -0.0 into +0.0: equal floats, equal keys
    bits = a.view(np.int32)
    key32 = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    packed = (key32.astype(np.int64) << 32) | np.arange(a.shape[1], dtype=np.int64)
    packed.sort(axis=1)
    order = torch.from_numpy(packed & np.int64(0xFFFFFFFF))
    keys = torch.from_numpy(packed >> 32)
    return keys, order


def _is_constant(flat: Tensor) -> Tensor:
    span = flat.max(dim=1).values - flat.min(dim=1).values
    scale = flat.abs().max(dim=1).values.clamp_min(1.0)
    return span <= 1e-12 * scale


def pearson(a: Tensor, b: Tensor, *, _name: str = "pearson") -> Tensor:
    """Pearson correlation per row of ``a`` and ``b`` (``[N, ...]``, flattened after dim 0) -> ``[N]``.

    Undefined cases (a constant row): both rows constant -> 1.0 (nothing distinguishes them), exactly one
    constant -> 0.0; either way an :class:`UndefinedMetricWarning` names how many rows.

    Example:
        >>> round(pearson(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]])).item(), 3)
        0.993
    """
    if a.shape != b.shape:
        raise ValueError(f"{_name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    step = _block_rows(a.shape[1])  # a block of rows at a time: the float64 copies stay a few MiB
    parts = [_pearson_rows(a[i : i + step], b[i : i + step]) for i in range(0, a.shape[0], step)] or \
        [_pearson_rows(a, b)]
    r, const_a, const_b = (torch.cat(p) for p in zip(*parts))
    both, one = const_a & const_b, const_a ^ const_b
    if bool((both | one).any()):
        _warn(
            f"{_name}: {int(both.sum())} pair(s) of constant maps (defined as correlation 1.0) and "
            f"{int(one.sum())} pair(s) with one constant map (defined as 0.0); an all-zero map has no ranking"
        )
    r = torch.where(both, torch.ones_like(r), r)
    return torch.where(one, torch.zeros_like(r), r)


def _pearson_rows(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``[n, L]`` ``a`` and ``b``: the correlation (constant rows not yet replaced) and which rows are
    constant in each."""
    fa, fb = torch.nan_to_num(a.double()), torch.nan_to_num(b.double())
    ca = fa - fa.mean(dim=1, keepdim=True)
    cb = fb - fb.mean(dim=1, keepdim=True)
    denom = ca.norm(dim=1) * cb.norm(dim=1)
    r = (ca * cb).sum(dim=1) / denom.clamp_min(1e-30)
    return r.clamp(-1.0, 1.0).float(), _is_constant(fa), _is_constant(fb)


def spearman(a: Tensor, b: Tensor, *, absolute: bool = True, _name: str = "spearman") -> Tensor:
    """Spearman rank correlation per image of two map batches ``[N, H, W]`` (or ``[N, L]``) -> ``[N]``.

    ``absolute=True`` ranks ``|M|`` (the package convention for signed maps). Ties get average ranks.
    A constant map (all-zero included) has no ranking: both constant -> 1.0, one constant -> 0.0, with an
    :class:`UndefinedMetricWarning`.

    Example:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 30.0]])).tolist()
        [1.0]
    """
    if a.shape != b.shape:
        raise ValueError(
            f"{_name}: map shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; "
            "resize with lightning_saliency.maps.resize first"
        )
    return pearson(_ranks(a, absolute), _ranks(b, absolute), _name=_name)


def _ranks(maps: Tensor, absolute: bool = True, infinite_as_zero: bool = False) -> Tensor:
    """``[N, L]`` ranks of each map (``|M|`` when ``absolute``; NaN read as 0, infinities as the largest floats, or
    as 0 with ``infinite_as_zero`` as :func:`_check_maps` reads them), a block of maps at a time: no full-size
    copy of the maps is made."""
    flat = maps.detach().reshape(maps.shape[0], -1)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    step, inf = _block_rows(flat.shape[1]), (0.0 if infinite_as_zero else None)
    for i in range(0, flat.shape[0], step):
        block = torch.nan_to_num(flat[i : i + step].float(), nan=0.0, posinf=inf, neginf=inf)
        out[i : i + step] = rank(block.abs() if absolute else block)
    return out


def _check_targets(targets: Tensor | None, n: int, name: str) -> Tensor:
    if targets is None:
        raise ValueError(
            f"{name} needs targets (a LongTensor [N]) so the explained class is held fixed under "
            "perturbation; pass e.g. model(inputs).argmax(1)"
        )
    targets = torch.as_tensor(targets).reshape(-1)
    if targets.shape[0] != n:
        raise ValueError(f"{name}: {n} inputs but {targets.shape[0]} targets")
    return targets


@contextlib.contextmanager
def _seeded_global_rng(seed: int, devices: list[int]) -> Iterator[None]:
    """Seed the global CPU generator (and those of the CUDA ``devices``) for the block, restoring them after.

    Seeds the generators directly rather than with ``torch.manual_seed``, which would also queue a seed for
    CUDA devices not initialised yet (a lasting side effect on their random state).
    """
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _row_noise(kind: str, shape: tuple[int, ...], seed: int, images: Tensor, draws: Tensor) -> Tensor:
    """``[R, *shape]`` float32 CPU noise, row ``r`` drawn for draw ``draws[r]`` of image ``images[r]`` (an index or
    a position in the whole probe) from a generator of its own, seeded by ``(seed, image, draw)``: ``kind`` ``"normal"`` (standard) or ``"uniform"``
    ([0, 1)). Each image's draws are then the same however the rows are chunked (``batch_size``).

    Example:
        >>> a = _row_noise("normal", (2,), 0, torch.tensor([0, 1]), torch.tensor([0, 0]))
        >>> torch.equal(a[1:], _row_noise("normal", (2,), 0, torch.tensor([1]), torch.tensor([0])))
        True
    """
    draw = torch.randn if kind == "normal" else torch.rand
    rows = [draw(shape, generator=torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + i * 7_919 + d * 104_729 + 54_321) % (2**63 - 1)))
        for i, d in zip(images.tolist(), draws.tolist())]
    return torch.stack(rows) if rows else torch.zeros(0, *shape)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the duration (restored after, also on errors): for code made of many
    operations on small tensors, where a second thread only adds the wake-up cost (``torch.linalg.eigh`` of a
    32 x 32 matrix takes 66 us on one thread and 255 us on two)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no grad for the duration, under a :class:`~lightning_saliency.guard.SideEffectGuard`:
    every module's ``training`` flag, the gradients and the RNGs restored, also on errors. Inside a forward-only
    guard of the same module (:meth:`~lightning_saliency.guard.SideEffectGuard.covers`), which restores all that
    when it exits, only ``no_grad``."""
    if SideEffectGuard.covers(model):
        with torch.no_grad():
            yield model
        return
    with SideEffectGuard(model, enable_grad=False), torch.no_grad():
        yield model


def _forward(model: nn.Module, x: Tensor, batch_size: int | None) -> Tensor:
    step = x.shape[0] if not batch_size else batch_size
    out = [model(x[i : i + step]) for i in range(0, x.shape[0], step)]
    logits = torch.cat(out) if len(out) > 1 else out[0]
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(
            "the model must return logits of shape [N, num_classes]; wrap it, e.g. "
            "lambda x: model(x).logits, in an nn.Module"
        )
    return logits.float()


def _probabilities(model: nn.Module, x: Tensor) -> Tensor:
    """``[N, K]`` confidences: a :class:`~lightning_saliency.tasks.TaskModel`'s task probabilities (the sigmoid
    of a binary or multi-label logit), else the softmax of the logits."""
    from ..tasks import TaskModel

    if isinstance(model, TaskModel):
        return model.probabilities(x).float()
    return _forward(model, x, None).softmax(dim=1)


def _targets(model: nn.Module, inputs: Tensor, targets: Tensor | None, batch_size: int | None) -> Tensor:
    if targets is None:
        return _forward(model, inputs, batch_size).argmax(dim=1)
    targets = torch.as_tensor(targets, device=inputs.device).reshape(-1).long()
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    return targets


def _position_keys(positions: Tensor | Sequence[int] | None, n: int, name: str) -> Tensor:
    """Each image's position in the whole probe (``[n]`` long, CPU; default ``0..n-1``), which keys its random
    draws so that a shard draws what the whole probe would for the same image.

    Example:
        >>> _position_keys(None, 3, "stability").tolist(), _position_keys([4, 5], 2, "stability").tolist()
        ([0, 1, 2], [4, 5])
    """
    if positions is None:
        return torch.arange(n)
    keys = torch.as_tensor(positions).reshape(-1).cpu().long()
    if keys.shape[0] != n:
        raise ValueError(f"{name}: {n} inputs but {keys.shape[0]} positions; pass one position per image")
    return keys
