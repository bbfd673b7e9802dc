"""ProbeSet: validation messages, deterministic (stratified) selection, fingerprint, state, subset and shards."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from lightning_saliency.probe import ProbeSet


def _images(n: int, hw: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


class DictData(Dataset):
    """Items {"image", "label", "site", optional masks}; each image is filled with its own index."""

    def __init__(self, labels: list[int], masks: bool = False, hw: int = 6) -> None:
        self._labels, self.masks, self.hw = labels, masks, hw
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> dict:
        self.loaded.append(i)
        item = {
            "image": torch.full((3, self.hw, self.hw), float(i)),
            "label": self._labels[i],
            "site": "a" if i % 3 else "b",
        }
        if self.masks:
            m = torch.zeros(self.hw, self.hw, dtype=torch.bool)
            m[: i % self.hw + 1] = True
            item["object_mask"] = m
            item["spurious_mask"] = ~m
        return item


def _ids(p: ProbeSet) -> list[int]:
    """Dataset indices of a probe built from DictData (each image holds its index)."""
    return [int(v) for v in p.inputs[:, 0, 0, 0]]


# ------------------------------------------------------------------------------- constructor checks


def test_constructor_stores_validated_tensors() -> None:
    x = _images(4)
    p = ProbeSet(x, [1, 0, 1, 2], groups=[0, 0, 1, 1], object_masks=torch.ones(4, 1, 6, 6))
    assert p.targets.dtype == torch.long and p.targets.tolist() == [1, 0, 1, 2]
    assert p.groups == ["0", "0", "1", "1"] and p.group_names == ["0", "1"]
    assert p.group_counts() == {"0": 2, "1": 2}
    assert p.object_masks.dtype == torch.bool and p.object_masks.shape == (4, 6, 6)
    assert p.spurious_masks is None
    assert p.indices.tolist() == [0, 1, 2, 3]
    assert p.class_counts() == {0: 1, 1: 2, 2: 1}
    r = repr(p)
    assert "n=4" in r and p.fingerprint[:12] in r and "object_masks=yes" in r


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inputs": torch.rand(3, 6, 6)}, r"\[N, C, H, W\].*unsqueeze"),
        ({"inputs": torch.rand(6, 6)}, r"\[N, C, H, W\]"),
        ({"inputs": torch.zeros(2, 3, 6, 6, dtype=torch.uint8)}, r"floating point.*float\(\) / 255"),
        ({"inputs": [[1.0]]}, "torch.stack"),
        ({"inputs": torch.full((2, 3, 6, 6), float("nan"))}, "NaN"),
        ({"targets": torch.tensor([0, 1, 2])}, r"shape \[N\] = \[2\]"),
        ({"targets": torch.eye(2)}, r"argmax\(dim=1\)"),
        ({"targets": torch.tensor([0.0, 1.0])}, r"targets.long\(\)"),
        ({"targets": torch.tensor([0, -1])}, ">= 0"),
        ({"groups": ["a"]}, "one name per input: got 1 names for 2"),
        ({"groups": "ab"}, "not a single string"),
        ({"object_masks": torch.ones(2, 5, 6)}, r"object_masks must be \[N, H, W\] = \[2, 6, 6\]"),
        ({"spurious_masks": torch.ones(3, 6, 6)}, r"spurious_masks must be \[N, H, W\] = \[2, 6, 6\]"),
        ({"object_masks": torch.full((2, 6, 6), 0.7)}, r"binary.*mask > 0.5"),
    ],
)
def test_constructor_errors_name_the_fix(kwargs: dict, message: str) -> None:
    args = {"inputs": _images(2), "targets": torch.tensor([0, 1])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ProbeSet(**args)


def test_empty_probe_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"empty.*non-empty dataset, size > 0"):
        ProbeSet(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_content_and_not_position_or_device() -> None:
    x, y = _images(4), torch.tensor([0, 1, 0, 1])
    a = ProbeSet(x, y, groups=list("aabb"))
    b = ProbeSet(x.clone(), y.clone(), groups=list("aabb"))
    assert len(a.fingerprint) == 64 and a.fingerprint == b.fingerprint
    assert a.to("cpu").fingerprint == a.fingerprint
    assert ProbeSet(x, y, groups=list("abab")).fingerprint != a.fingerprint
    assert ProbeSet(x, y).fingerprint != a.fingerprint
    assert ProbeSet(x.double(), y, groups=list("aabb")).fingerprint != a.fingerprint
    assert ProbeSet(x, torch.tensor([0, 1, 1, 1]), groups=list("aabb")).fingerprint != a.fingerprint
    masked = ProbeSet(x, y, groups=list("aabb"), spurious_masks=torch.zeros(4, 6, 6))
    assert masked.fingerprint != a.fingerprint
    # an in-place edit of one pixel invalidates the cached fingerprint
    before = b.fingerprint
    b.inputs[2, 1, 3, 3] += 1e-3
    assert b.fingerprint != before
    # subsets with the same content have the same fingerprint, whatever their positions
    assert a.subset([0, 1]).fingerprint == ProbeSet(x[:2], y[:2], groups=["a", "a"]).fingerprint


# ------------------------------------------------------------------------------- from_dataset


def test_same_seed_same_selection_different_seed_different() -> None:
    data = DictData([i % 4 for i in range(50)])
    a = ProbeSet.from_dataset(data, size=10, seed=0)
    b = ProbeSet.from_dataset(data, size=10, seed=0)
    c = ProbeSet.from_dataset(data, size=10, seed=1)
    assert _ids(a) == _ids(b) and a.fingerprint == b.fingerprint
    assert _ids(a) != _ids(c) and a.fingerprint != c.fingerprint
    assert _ids(a) == sorted(_ids(a)) and len(set(_ids(a))) == 10  # dataset order, no repeats
    assert a.targets.tolist() == [i % 4 for i in _ids(a)]


def test_selection_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    ProbeSet.from_dataset(DictData([0, 1] * 10), size=5, seed=3, stratify=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_stratified_selection_is_balanced_and_deterministic() -> None:
    labels = [0] * 70 + [1] * 20 + [2] * 10
    data = DictData(labels)
    p = ProbeSet.from_dataset(data, size=30, seed=0, stratify=True)
    assert p.class_counts() == {0: 10, 1: 10, 2: 10}
    assert _ids(ProbeSet.from_dataset(data, size=30, seed=0, stratify=True)) == _ids(p)
    assert _ids(ProbeSet.from_dataset(data, size=30, seed=1, stratify=True)) != _ids(p)
    # a remainder of one: some class gets 11, the others 10
    assert sorted(ProbeSet.from_dataset(data, size=31, seed=0, stratify=True).class_counts().values()) == [
        10,
        10,
        11,
    ]
    # class 2 has only 10 items: its missing share goes to the others
    assert ProbeSet.from_dataset(data, size=50, seed=0, stratify=True).class_counts() == {0: 20, 1: 20, 2: 10}
    # unstratified, the same size follows the 70/20/10 mix instead
    assert ProbeSet.from_dataset(data, size=30, seed=0).class_counts()[0] > 10


def test_stratify_reads_dataset_targets_without_loading_every_item() -> None:
    data = DictData([i % 3 for i in range(40)])
    data.targets = list(data._labels)
    ProbeSet.from_dataset(data, size=6, seed=0, stratify=True)
    assert len(data.loaded) == 6
    # a torch Subset of such a dataset: targets taken through its indices
    data.loaded.clear()
    sub = Subset(data, list(range(0, 40, 2)))
    p = ProbeSet.from_dataset(sub, size=6, seed=0, stratify=True)
    assert len(data.loaded) == 6 and p.class_counts() == {0: 2, 1: 2, 2: 2}
    # without a targets attribute every item is read once for its label, then the chosen ones
    plain = DictData([i % 3 for i in range(12)])
    ProbeSet.from_dataset(plain, size=3, seed=0, stratify=True)
    assert len(plain.loaded) == 12 + 3


def test_tuple_items_custom_keys_groups_and_mask_functions() -> None:
    x = _images(20)
    tuples = [(i, x[i], i % 2) for i in range(20)]  # (id, image, label)

    def mask(sample):
        m = np.zeros((6, 6), dtype=np.uint8)
        m[: sample[0] % 6 + 1] = 1
        return m

    p = ProbeSet.from_dataset(
        tuples,
        size=8,
        seed=0,
        input_key=1,
        target_key=2,
        group_fn=lambda s: "even" if s[0] % 2 == 0 else "odd",
        object_mask_fn=mask,
        spurious_mask_fn=lambda s: torch.ones(1, 6, 6),
    )
    picked = [next(i for i in range(20) if torch.equal(x[i], img)) for img in p.inputs]
    assert p.targets.tolist() == [i % 2 for i in picked]
    assert p.groups == ["even" if i % 2 == 0 else "odd" for i in picked]
    assert [int(m.any(dim=1).sum()) for m in p.object_masks] == [i % 6 + 1 for i in picked]
    assert p.spurious_masks.all() and p.spurious_masks.shape == (8, 6, 6)


def test_dict_items_with_masks_under_their_keys_and_other_key_names() -> None:
    p = ProbeSet.from_dataset(
        DictData(list(range(5)) * 2, masks=True), size=4, seed=0, group_fn=lambda s: s["site"]
    )
    ids = _ids(p)
    assert p.object_masks is not None and p.spurious_masks is not None
    assert torch.equal(p.spurious_masks, ~p.object_masks)
    assert p.groups == ["a" if i % 3 else "b" for i in ids]
    other = [{"input": torch.rand(1, 4, 4), "target": torch.tensor(i % 2)} for i in range(6)]
    assert len(ProbeSet.from_dataset(other, size=3)) == 3


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        ([{"img_": torch.rand(3, 4, 4), "label": 0}], {}, r"none of the usual input keys.*input_key="),
        ([{"image": torch.rand(3, 4, 4), "label": 0}], {"target_key": "cls"}, r"target_key='cls' is not in"),
        ([(torch.rand(3, 4, 4),)], {}, r"target_key=1 is out of range"),
        ([{"image": np.zeros((4, 4, 3), dtype=np.uint8), "label": 0}], {}, r"not floating point.*ToTensor"),
        ([{"image": torch.rand(4, 4), "label": 0}], {}, r"\[C, H, W\].*unsqueeze\(0\)"),
        ([{"image": "x.png", "label": 0}], {}, r"not a tensor.*ToTensor"),
        ([{"image": torch.rand(3, 4, 4), "label": torch.tensor([0.0, 1.0])}], {}, r"one class index.*argmax"),
        ([torch.rand(3, 4, 4)], {}, r"dicts.*or tuples"),
        (
            [{"image": torch.rand(3, 4, 4), "label": 0}, {"image": torch.rand(3, 5, 5), "label": 0}],
            {"size": 2},
            r"share one size.*Resize",
        ),
        (
            [{"image": torch.rand(3, 4, 4), "label": 0}],
            {"object_mask_fn": lambda s: torch.ones(5, 5)},
            r"item 0.*4x4",
        ),
        (
            [{"image": torch.rand(3, 4, 4), "label": 0, "spurious_mask": torch.ones(4, 4)}]
            + [{"image": torch.rand(3, 4, 4), "label": 1}],
            {"size": 2},
            r"spurious_mask is given for some items but not for items \[1\]",
        ),
        (
            [{"image": torch.rand(3, 4, 4), "label": 0, "object_mask": torch.full((4, 4), 255)}],
            {},
            r"mask > 127",
        ),
        ([{"image": torch.rand(3, 4, 4), "label": 0}], {"size": 0}, r"size must be >= 1"),
        ([], {}, r"dataset is empty: pass a non-empty dataset"),
    ],
)
def test_from_dataset_errors_name_the_fix(data: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProbeSet.from_dataset(data, **{"size": 1, **kwargs})


def test_size_larger_than_the_dataset_takes_everything_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="size=10 but the dataset has only 4 items; using all 4"):
        p = ProbeSet.from_dataset(DictData([0, 1, 0, 1]), size=10)
    assert _ids(p) == [0, 1, 2, 3]


def test_iterable_dataset_is_read_as_a_stream() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(100):
                yield {"image": torch.full((3, 4, 4), float(i)), "label": i % 2}

    a = ProbeSet.from_dataset(Stream(), size=5, seed=0)
    assert len(a) == 5 and max(_ids(a)) < 10  # pool of 2 * size items from the start of the stream
    assert _ids(ProbeSet.from_dataset(Stream(), size=5, seed=0)) == _ids(a)


# ------------------------------------------------------------------------------- from_dataloader


def test_from_dataloader_tuple_and_dict_batches() -> None:
    x, y = _images(30), torch.arange(30) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    p = ProbeSet.from_dataloader(loader, size=6, seed=0, stratify=True, group_fn=lambda s: int(s[1]) % 2)
    assert len(p) == 6 and p.class_counts() == {0: 2, 1: 2, 2: 2}
    assert p.groups == [str(int(t) % 2) for t in p.targets]
    pos = [next(i for i in range(30) if torch.equal(x[i], img)) for img in p.inputs]
    assert max(pos) < 12 and pos == sorted(pos)  # drawn from the first 2 * size samples, in loader order
    assert p.targets.tolist() == [int(y[i]) for i in pos]
    q = ProbeSet.from_dataloader(loader, size=6, seed=0, stratify=True, group_fn=lambda s: int(s[1]) % 2)
    assert q.fingerprint == p.fingerprint

    data = DictData([i % 2 for i in range(20)], masks=True)
    dict_loader = DataLoader(data, batch_size=3)
    d = ProbeSet.from_dataloader(dict_loader, size=5, seed=1, pool_size=20, group_fn=lambda s: s["site"])
    assert len(d) == 5 and d.object_masks.shape == (5, 6, 6)
    assert d.groups == ["a" if i % 3 else "b" for i in _ids(d)]


def test_from_dataloader_warns_about_unseeded_shuffling_and_checks_batches() -> None:
    ds = TensorDataset(_images(8), torch.arange(8) % 2)
    with pytest.warns(UserWarning, match="shuffles without a seeded generator"):
        ProbeSet.from_dataloader(DataLoader(ds, batch_size=4, shuffle=True), size=2)
    seeded = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProbeSet.from_dataloader(seeded, size=2)
    with pytest.raises(ValueError, match="needs targets too"):
        ProbeSet.from_dataloader(DataLoader(_images(4), batch_size=2), size=2)
    with pytest.raises(ValueError, match="yielded no samples"):
        ProbeSet.from_dataloader([], size=2)
    with pytest.raises(ValueError, match="pool_size must be >= size"):
        ProbeSet.from_dataloader(DataLoader(ds), size=4, pool_size=2)


# ------------------------------------------------------------------------------- state, views, shards


def _full_probe(n: int = 7) -> ProbeSet:
    return ProbeSet(
        _images(n),
        torch.arange(n) % 3,
        groups=[f"g{i % 2}" for i in range(n)],
        object_masks=torch.rand(n, 6, 6) > 0.5,
        spurious_masks=torch.rand(n, 6, 6) > 0.5,
    )


def test_state_dict_round_trip_through_torch_save_weights_only() -> None:
    p = _full_probe()
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    q = ProbeSet.from_state_dict(state)
    assert q.fingerprint == p.fingerprint and q.groups == p.groups
    assert torch.equal(q.object_masks, p.object_masks) and torch.equal(q.indices, p.indices)
    r = ProbeSet(_images(2), [0, 0])
    r.load_state_dict(state)
    assert r.fingerprint == p.fingerprint and len(r) == 7
    # the state is a copy: editing it does not touch the probe
    state["inputs"][0] += 1
    assert r.fingerprint == p.fingerprint


def test_load_state_dict_rejects_tampered_or_foreign_state() -> None:
    state = _full_probe().state_dict()
    state["targets"] = state["targets"].flip(0)
    with pytest.raises(ValueError, match="does not match its tensors"):
        ProbeSet.from_state_dict(state)
    with pytest.raises(ValueError, match="unknown ProbeSet state version"):
        ProbeSet.from_state_dict({"version": 99})
    with pytest.raises(ValueError, match=r"missing \['targets'\]"):
        ProbeSet.from_state_dict({"version": 1, "inputs": _images(1)})


def test_subset_keeps_global_indices_and_checks_them() -> None:
    p = _full_probe()
    s = p.subset([5, 1])
    assert s.indices.tolist() == [5, 1] and s.groups == ["g1", "g1"]
    assert torch.equal(s.inputs, p.inputs[[5, 1]]) and torch.equal(s.object_masks, p.object_masks[[5, 1]])
    assert s.subset([1]).indices.tolist() == [1]  # positions in the full probe, not in the subset
    mask = torch.tensor([True, False] * 3 + [True])
    assert p.subset(mask).indices.tolist() == [0, 2, 4, 6]
    with pytest.raises(ValueError, match=r"lie in \[0, 7\)"):
        p.subset([7])
    with pytest.raises(ValueError, match="bool subset mask must have shape"):
        p.subset(torch.tensor([True, False]))


@pytest.mark.parametrize("n, world", [(7, 3), (8, 4), (2, 3), (5, 1)])
def test_shards_are_contiguous_cover_everything_and_gather_back_in_order(n: int, world: int) -> None:
    p = _full_probe(n)
    shards = [p.shard(r, world) for r in range(world)]
    sizes = [len(s) for s in shards]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    order = torch.cat([s.indices for s in shards])
    assert order.tolist() == list(range(n))
    for s in shards:
        if len(s):
            idx = s.indices.tolist()
            assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous
            assert torch.equal(s.inputs, p.inputs[idx]) and s.groups == [p.groups[i] for i in idx]
    # gathering per-rank results by their indices restores the probe order
    gathered = torch.empty(n)
    for s in shards:
        gathered[s.indices] = s.targets.float()
    assert torch.equal(gathered, p.targets.float())
    assert [s.fingerprint for s in (p.shard(r, world) for r in range(world))] == [
        s.fingerprint for s in shards
    ]


def test_shard_argument_errors() -> None:
    p = _full_probe(4)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        p.shard(2, 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        p.shard(0, 0)


def test_multi_hot_targets_take_one_mask_per_label():
    """Masks [N, C, H, W] beside multi-hot targets: each (image, label) row gets its own label's mask; masks
    [N, H, W] are repeated on the image's rows; a per-label stack missing a label is an error naming both forms."""
    x = torch.rand(2, 1, 4, 4)
    y = torch.tensor([[1, 1, 0], [0, 1, 1]])
    m = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    m[0, 0, 0, 0] = m[0, 1, 1, 1] = m[1, 1, 2, 2] = m[1, 2, 3, 3] = True
    p = ProbeSet(x, y, object_masks=m, spurious_masks=m[:, 0])
    assert p.targets.tolist() == [0, 1, 1, 2]
    assert [tuple(o.nonzero()[0].tolist()) for o in p.object_masks] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert p.spurious_masks.flatten(1).sum(1).tolist() == [1, 1, 0, 0]  # image 0's mask on both of its rows
    with pytest.raises(ValueError, match=r"per label must be \[N, C, H, W\].*one mask per image"):
        ProbeSet(x, y, object_masks=m[:, :2])
