"""Discovery (SpRAy, metrics/discovery.py): a planted minority pattern is found with its exact members and
region; maps without one give no candidate; small classes are reported; the result is deterministic."""

from __future__ import annotations

import torch

from lightning_saliency.metrics import discover, spectral_clusters


def _planted(seed: int = 0, n: int = 12, minority: int = 4, size: int = 32, noise: float = 0.3):
    """``n`` maps of one class bright in the centre (plus noise); ``minority`` of them, at random positions,
    bright in the top-right corner instead."""
    g = torch.Generator().manual_seed(seed)
    maps = noise * torch.rand(n, size, size, generator=g)
    odd = torch.randperm(n, generator=g)[:minority]
    centre = slice(size // 2 - 4, size // 2 + 4)
    for i in range(n):
        if i in odd.tolist():
            maps[i, 0:8, size - 8 :] += 1.0
        else:
            maps[i, centre, centre] += 1.0
    return maps, sorted(odd.tolist())


def test_a_planted_minority_pattern_is_found_with_its_exact_members_and_region():
    for seed in range(4):
        maps, odd = _planted(seed)
        found = discover(maps, torch.zeros(12, dtype=torch.long))
        assert len(found["candidates"]) == 1, seed
        cand = found["candidates"][0]
        assert cand["members"] == odd and cand["class"] == 0
        assert cand["region"] == [0, 24, 8, 32]  # the corner, in input pixels (8x8 grid: 4-pixel cells)
        assert cand["mask"].shape == (32, 32) and int(cand["mask"].sum()) == 64
        assert 0.15 <= cand["score"] <= 1 and cand["area"] <= 0.25 and found["too_small"] == []


def test_members_are_reported_as_probe_indices_and_classes_are_clustered_separately():
    maps, odd = _planted(1)
    other, _ = _planted(2, minority=0)
    both = torch.cat([other, maps])
    classes = torch.tensor([1] * 12 + [0] * 12)
    found = discover(both, classes, indices=torch.arange(100, 124))
    assert [c["class"] for c in found["candidates"]] == [0]
    assert found["candidates"][0]["members"] == [112 + i for i in odd]
    assert set(found["n_clusters"]) == {0, 1}


def test_no_candidate_without_a_minority_pattern():
    g = torch.Generator().manual_seed(0)
    classes = torch.zeros(16, dtype=torch.long)
    assert discover(torch.ones(16, 32, 32), classes)["candidates"] == []  # uniform maps
    assert discover(torch.zeros(16, 32, 32), classes)["candidates"] == []  # all-zero maps
    same, _ = _planted(0, n=16, minority=0)  # all centred (with noise)
    assert discover(same, classes)["candidates"] == []
    assert discover(torch.rand(16, 32, 32, generator=g), classes)["candidates"] == []  # pure noise
    # a majority is not a minority: 8 of 12 in the corner (the 4 centred ones use the centre, which the
    # corner maps do not: a centre region of 4 of 12 maps is a minority, the only candidate)
    maps, odd = _planted(3, minority=8)
    found = discover(maps, torch.zeros(12, dtype=torch.long))
    assert all(len(c["members"]) <= 0.6 * 12 for c in found["candidates"])
    assert all(c["members"] == [i for i in range(12) if i not in odd] for c in found["candidates"])


def test_small_classes_are_reported_and_not_clustered():
    maps, _ = _planted(0)
    classes = torch.tensor([0] * 7 + [1] * 5)
    found = discover(maps, classes)
    assert found["too_small"] == [1] and 1 not in found["clusters"]
    assert discover(maps, torch.zeros(12, dtype=torch.long), min_class_size=13)["too_small"] == [0]


def test_deterministic_and_the_global_rng_is_untouched():
    maps, _ = _planted(5, noise=0.8)
    state = torch.random.get_rng_state()
    a = discover(maps, torch.zeros(12, dtype=torch.long), seed=3)
    b = discover(maps, torch.zeros(12, dtype=torch.long), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a["clusters"] == b["clusters"] and len(a["candidates"]) == len(b["candidates"])
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["members"] == y["members"] and x["score"] == y["score"] and torch.equal(x["mask"], y["mask"])


def test_the_eigengap_picks_the_number_of_clusters():
    blobs = torch.cat([torch.eye(3)[k].repeat(5, 1) + 0.01 * torch.rand(5, 3) for k in range(3)])
    r = spectral_clusters(blobs)
    assert r["n_clusters"] == 3 and r["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert spectral_clusters(torch.ones(12, 4))["n_clusters"] == 1  # no structure: not split


def test_a_minority_holding_the_class_object_off_centre_shares_its_region_with_the_rest_and_is_no_candidate():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def blob(cx: float) -> torch.Tensor:
        return torch.exp(-((yy - 16) ** 2 + (xx - cx) ** 2) / 32.0)

    g = torch.Generator().manual_seed(0)
    maps = torch.stack([blob(18.0) if i < 4 else blob(14.0) for i in range(12)])
    maps = maps + 0.05 * torch.rand(12, 32, 32, generator=g)
    classes = torch.zeros(12, dtype=torch.long)
    loose = discover(maps, classes, max_rest_ratio=10.0)["candidates"]  # the cluster itself is found ...
    assert [c["members"] for c in loose] == [[0, 1, 2, 3]] and loose[0]["rest_inside"] > 0.2 * loose[0]["inside"]
    assert discover(maps, classes)["candidates"] == []  # ... but the rest of the class uses its region too
