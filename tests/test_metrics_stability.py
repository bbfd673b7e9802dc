"""stability, max_sensitivity, drift and the rank helpers: known answers, seeding, batching, no NaN."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_saliency.metrics import (
    UndefinedMetricWarning,
    drift,
    max_sensitivity,
    pearson,
    rank,
    spearman,
    stability,
)


def test_rank_matches_scipy_average_ranks_with_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (7, 40), generator=g).float()  # many ties
    x[3] = 2.0  # a constant row
    expected = np.stack([stats.rankdata(row) for row in x.numpy()])
    assert np.array_equal(rank(x).numpy(), expected.astype(np.float32))
    assert rank(x.reshape(7, 5, 8)).shape == (7, 5, 8)


def test_rank_fast_cpu_path_equals_scipy_on_awkward_floats():
    """float32 on the CPU goes through packed integer keys; signs, -0.0, infinities and denormals must rank
    exactly as scipy ranks them (and as the plain torch.sort path, used for float64, does)."""
    g = torch.Generator().manual_seed(2)
    awkward = torch.tensor([[0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.4e38, -3.4e38,
                             0.0, -1.0]])
    for x in (awkward, torch.randn(16, 300, generator=g), torch.relu(torch.randn(8, 64, generator=g)),
              torch.randint(-3, 4, (9, 50), generator=g).float()):
        expected = np.stack([stats.rankdata(row) for row in x.numpy()]).astype(np.float32)
        assert np.array_equal(rank(x).numpy(), expected)
        assert np.array_equal(rank(x.double()).numpy(), expected)


def test_spearman_matches_scipy_and_known_values():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 6, (5, 6, 6), generator=g).float()
    b = a + torch.randint(0, 3, (5, 6, 6), generator=g).float()
    ours = spearman(a, b)
    ref = [stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a.numpy(), b.numpy())]
    assert np.allclose(ours.numpy(), ref, atol=1e-6)
    assert spearman(a + 1, 3 * (a + 1)).tolist() == [1.0] * 5
    flat = torch.arange(1.0, 17.0).reshape(1, 4, 4)
    assert spearman(flat, 17.0 - flat).item() == pytest.approx(-1.0)
    # |M| convention: a sign flip of the whole map does not change the ranking
    assert spearman(flat, -flat).item() == 1.0
    assert spearman(flat, -flat, absolute=False).item() == pytest.approx(-1.0)


def test_constant_maps_have_defined_correlation():
    zero, ramp = torch.zeros(2, 4, 4), torch.arange(32.0).reshape(2, 4, 4)
    with pytest.warns(UndefinedMetricWarning, match="constant"):
        assert spearman(zero, zero).tolist() == [1.0, 1.0]
    with pytest.warns(UndefinedMetricWarning):
        assert spearman(zero, ramp).tolist() == [0.0, 0.0]
    with pytest.warns(UndefinedMetricWarning):
        assert pearson(torch.ones(1, 5), torch.full((1, 5), 2.0)).tolist() == [1.0]


def _linear_explain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A 'method' whose map is a fixed smooth function of the input."""
    return x.mean(dim=1) ** 2


def _inputs(n=4, size=12, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_maps_have_stability_one():
    x, t = _inputs(), torch.zeros(4, dtype=torch.long)
    fixed = torch.rand(4, 12, 12)
    assert torch.allclose(
        stability(lambda xi, ti: fixed.repeat_interleave(len(xi) // 4, 0), x, t), torch.ones(4)
    )
    assert torch.allclose(stability(_linear_explain, x, t, sigma=0.0), torch.ones(4))
    # small noise keeps the ranking mostly; large noise destroys it
    small, large = stability(_linear_explain, x, t, sigma=0.01), stability(_linear_explain, x, t, sigma=5.0)
    assert small.min() > 0.95 and large.max() < 0.5


def test_random_maps_have_stability_near_zero():
    g = torch.Generator().manual_seed(3)

    def random_explain(x, t):
        return torch.rand(x.shape[0], 16, 16, generator=g)

    x, t = _inputs(n=16, size=16), torch.zeros(16, dtype=torch.long)
    s = stability(random_explain, x, t, k=4)
    assert abs(s.mean().item()) < 0.03 and s.abs().max().item() < 0.1


def test_stability_is_seeded_and_leaves_the_global_rng_alone():
    x, t = _inputs(), torch.zeros(4, dtype=torch.long)
    state = torch.get_rng_state()
    a = stability(_linear_explain, x, t, sigma=0.5, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, stability(_linear_explain, x, t, sigma=0.5, seed=0))
    assert not torch.equal(a, stability(_linear_explain, x, t, sigma=0.5, seed=1))


def test_noise_is_relative_to_each_images_std():
    seen = []

    def explain(x, t):
        seen.append(x)
        return _linear_explain(x, t)

    x = _inputs(n=2)
    x[1] = x[0] * 100.0  # the same picture at a hundred times the scale
    stability(explain, x, torch.zeros(2, dtype=torch.long), k=64, sigma=0.1, maps=_linear_explain(x, None))
    (noisy,) = seen
    delta = (noisy - x.repeat_interleave(64, 0)).reshape(2, 64, -1)
    ratio = delta.std(dim=(1, 2)) / x.reshape(2, -1).std(dim=1)
    assert torch.allclose(ratio, torch.full((2,), 0.1), rtol=0.03)


def test_targets_held_fixed_batches_bounded_and_maps_reused():
    calls = []

    def explain(x, t):
        calls.append((x.shape[0], t.clone()))
        return _linear_explain(x, t)

    x, t = _inputs(n=3), torch.tensor([2, 0, 1])
    stability(explain, x, t, k=5, batch_size=6, maps=_linear_explain(x, t))
    assert [n for n, _ in calls] == [6, 6, 3]  # 2 draws, 2 draws, 1 draw of all 3 images
    assert torch.equal(calls[0][1], torch.tensor([2, 2, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="targets"):
        stability(explain, x, None)


def test_augment_replaces_noise_and_runs_under_a_forked_rng():
    x, t = _inputs(), torch.zeros(4, dtype=torch.long)
    state = torch.get_rng_state()
    jitter = lambda z: z * (1 + 0.5 * torch.rand(z.shape[0], 1, 1, 1))  # noqa: E731  global RNG inside
    a = stability(_linear_explain, x, t, augment=jitter)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(a, torch.ones(4))  # a brightness change keeps the ranking of x.mean(1)**2
    assert torch.equal(a, stability(_linear_explain, x, t, augment=jitter))


def test_all_zero_maps_give_defined_stability():
    x, t = _inputs(), torch.zeros(4, dtype=torch.long)
    with pytest.warns(UndefinedMetricWarning):
        s = stability(lambda xi, ti: torch.zeros(xi.shape[0], 12, 12), x, t)
    assert s.tolist() == [1.0] * 4
    with pytest.warns(UndefinedMetricWarning):
        ms = max_sensitivity(lambda xi, ti: torch.zeros(xi.shape[0], 12, 12), x, t)
    assert ms.tolist() == [0.0] * 4


def test_max_sensitivity_known_answer():
    x, t = _inputs(), torch.zeros(4, dtype=torch.long)
    explain = lambda xi, ti: xi.sum(dim=1)  # noqa: E731  linear: M(x + d) - M(x) = M(d)
    shift = 0.25

    def perturb(z):
        return z + shift

    expected = (3 * shift * 12) / explain(x, t).reshape(4, -1).norm(dim=1)  # ||3·shift||_F over 144 px
    assert torch.allclose(max_sensitivity(explain, x, t, perturb=perturb), expected, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms = max_sensitivity(explain, x, t, n_perturb=6, radius=0.1, batch_size=8)
    assert ms.shape == (4,) and torch.isfinite(ms).all() and (ms > 0).all()


def test_drift():
    m = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert drift(m, 5 * m + 1).tolist() == [1.0] * 3
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = m.reshape(3, -1)[:, perm].reshape(3, 8, 8)
    expected = [stats.spearmanr(a, b)[0] for a, b in zip(m.reshape(3, -1).numpy(), shuffled.reshape(3, -1).numpy())]
    assert drift(m, shuffled).tolist() == pytest.approx(expected, abs=1e-6)
    assert max(abs(e) for e in expected) < 0.4  # a shuffle leaves no ranking to speak of
    with pytest.raises(ValueError, match="probe changed"):
        drift(m, m[:2])
    with pytest.raises(ValueError, match="resize"):
        drift(m, torch.rand(3, 4, 4))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.net(x))


def test_gradient_explain_stability_equals_scipy_on_the_same_draws():
    """A real gradient map: the value is the mean over draws of scipy's Spearman between the clean map and the
    map of x + sigma * std(x) * z, z of draw j of image i from a generator of its own seeded by (seed, i, j); the
    same value whatever batch_size chunks the draws into."""
    model = _Tiny().eval()

    def explain(x, t):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
        return g.abs().amax(1)

    x = _inputs(n=4)
    t = model(x).argmax(1)
    k, sigma = 3, 0.05
    s = stability(explain, x, t, k=k, sigma=sigma, seed=7)
    expanded = x.repeat_interleave(k, 0)
    images, draws = torch.arange(4).repeat_interleave(k), torch.arange(k).repeat(4)
    z = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
        (7 * 1_000_003 + int(i) * 7_919 + int(j) * 104_729 + 54_321) % (2**63 - 1))) for i, j in zip(images, draws)])
    std = expanded.reshape(len(expanded), -1).std(dim=1, unbiased=False).reshape(-1, 1, 1, 1)
    noisy = explain(expanded + z * sigma * std, t.repeat_interleave(k)).reshape(4, k, -1).numpy()
    clean = explain(x, t).reshape(4, -1).numpy()
    expected = [np.mean([stats.spearmanr(clean[i], noisy[i, j]).statistic for j in range(k)]) for i in range(4)]
    assert s.tolist() == pytest.approx(expected, abs=1e-5)
    for batch_size in (1, 4, 5):  # one draw of one image, one of each image, one and a bit: the same draws
        chunked = stability(explain, x, t, k=k, sigma=sigma, seed=7, batch_size=batch_size)
        assert chunked.tolist() == pytest.approx(s.tolist(), abs=1e-6)
    assert 0.5 < min(expected) < max(expected) < 1.0  # noise this small moves the ranking a little, not all of it


def test_dict_explain_scores_every_method_from_the_same_draws():
    x, t = _inputs(), torch.zeros(4, dtype=torch.long)
    calls = []

    def one(xi, ti):
        return xi.mean(1) ** 2

    def two(xi, ti):
        return xi.amax(1)

    def both(xi, ti):
        calls.append(xi.shape[0])
        return {"sq": one(xi, ti), "max": two(xi, ti)}

    s = stability(both, x, t, k=3, sigma=0.3)
    assert set(s) == {"sq", "max"} and calls == [4, 12]  # clean maps once, then all draws in one call
    assert torch.equal(s["sq"], stability(one, x, t, k=3, sigma=0.3))
    assert torch.equal(s["max"], stability(two, x, t, k=3, sigma=0.3))
    ms = max_sensitivity(both, x, t, n_perturb=4, maps=both(x, t))
    assert torch.equal(ms["max"], max_sensitivity(two, x, t, n_perturb=4))
    with pytest.raises(ValueError, match="same methods"):
        stability(both, x, t, maps={"other": one(x, t)})


def test_augment_draws_differ_between_chunks():
    x, t = _inputs(n=2), torch.zeros(2, dtype=torch.long)
    factors = []

    def jitter(z):
        f = 1 + torch.rand(z.shape[0], 1, 1, 1)
        factors.append(f.flatten())
        return z * f

    stability(_linear_explain, x, t, k=3, augment=jitter, batch_size=2)  # one draw per chunk
    assert len(factors) == 3
    assert not torch.equal(factors[0], factors[1]) and not torch.equal(factors[1], factors[2])


def test_drift_from_ranks_equals_drift_and_checks_shapes():
    from lightning_saliency.metrics import drift_from_ranks, map_ranks

    g = torch.Generator().manual_seed(4)
    prev, cur = torch.randn(5, 6, 6, generator=g), torch.relu(torch.randn(5, 6, 6, generator=g))
    assert torch.equal(drift_from_ranks(map_ranks(prev), map_ranks(cur)), drift(prev, cur))
    with pytest.raises(ValueError, match="probe changed"):
        drift_from_ranks(map_ranks(prev), map_ranks(cur[:3]))
    with pytest.raises(ValueError, match="map sizes differ"):
        drift_from_ranks(map_ranks(prev), map_ranks(torch.rand(5, 4, 4)))
