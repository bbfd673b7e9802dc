"""The patch-grid methods ``shapley`` and ``lime`` (methods/perturbation.py): known answers on a patch-additive
model, agreement with Captum's ShapleyValueSampling and Lime on a trained CNN, private random state, option
errors; and the cell geometry they share with the agreement metrics (patches.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_saliency import attribute
from lightning_saliency.methods.perturbation import antithetic_permutations, lime_kernel, ridge_fit
from lightning_saliency.metrics import pearson
from lightning_saliency.patches import baseline_images, cell_edges, cell_index, gaussian_blur, paint, pool


def _edges(size: int, cells: int) -> list[int]:  # the documented rule, written out again
    return [int(j * size / cells) for j in range(cells + 1)]


class PatchAdditive(nn.Module):
    """logit_k = Σ_cells W[k, c] · (mean of cell c over channels and pixels) + b_k, cells by the documented
    boundaries (computed with loops here, independently of patches.py)."""

    def __init__(self, height: int, width: int, grid: tuple[int, int], classes: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.rows, self.cols = _edges(height, grid[0]), _edges(width, grid[1])
        self.weight = nn.Parameter(torch.randn(classes, grid[0] * grid[1], generator=g))
        self.bias = nn.Parameter(torch.randn(classes, generator=g))

    def cell_means(self, x: torch.Tensor) -> torch.Tensor:
        means = [x[:, :, r0:r1, c0:c1].mean(dim=(1, 2, 3))
                 for r0, r1 in zip(self.rows, self.rows[1:]) for c0, c1 in zip(self.cols, self.cols[1:])]
        return torch.stack(means, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cell_means(x) @ self.weight.T + self.bias


def test_cells_follow_the_documented_boundaries_also_when_the_grid_does_not_divide_the_image():
    assert cell_edges(10, 3) == [0, 3, 6, 10] == _edges(10, 3)
    assert cell_edges(32, 8) == list(range(0, 33, 4))
    idx = cell_index(10, 7, (3, 2))
    # rows [0,3) [3,6) [6,10), cols [0,3) [3,7)
    assert idx[:, 0].tolist() == [0, 0, 0, 2, 2, 2, 4, 4, 4, 4]
    assert idx[0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert torch.bincount(idx.flatten()).tolist() == [9, 12, 9, 12, 12, 16]
    maps = torch.rand(2, 10, 7)
    cells = pool(maps, (3, 2))
    torch.testing.assert_close(cells[:, 5], maps[:, 6:, 3:].mean(dim=(1, 2)))
    torch.testing.assert_close(pool(paint(cells, 10, 7, (3, 2)), (3, 2)), cells)
    with pytest.raises(ValueError, match="more cells than the image has pixels"):
        cell_index(4, 4, 5)


@pytest.mark.parametrize("baseline", [0.5, "mean", "blur"])
@pytest.mark.parametrize("size, grid", [((32, 32), (8, 8)), ((30, 27), (5, 4))])
def test_shapley_is_exact_and_lime_recovers_it_on_a_patch_additive_model(baseline, size, grid):
    torch.manual_seed(0)
    model = PatchAdditive(*size, grid)
    x = torch.randn(4, 3, *size)
    t = torch.tensor([0, 1, 2, 0])
    maps = attribute(model, x, t, methods=("shapley", "lime"), shapley_grid=grid, lime_grid=grid,
                     shapley_baseline=baseline, lime_baseline=baseline, shapley_permutations=3)
    base = x.mean(dim=(2, 3), keepdim=True).expand_as(x) if baseline == "mean" else \
        gaussian_blur(x, 1.5) if baseline == "blur" else torch.full_like(x, 0.5)
    with torch.no_grad():
        exact = model.weight[t] * (model.cell_means(x) - model.cell_means(base))  # [N, cells]
    shap = maps["shapley"]
    assert shap.shape == (4, *size) and shap.dtype == torch.float32
    torch.testing.assert_close(pool(shap, grid), exact, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shap, paint(exact, *size, grid), atol=1e-5, rtol=1e-4)  # every pixel: its cell
    lime_cells = pool(maps["lime"], grid)
    torch.testing.assert_close(maps["lime"], paint(lime_cells, *size, grid))
    r = pearson(lime_cells, exact)
    assert bool((r >= 0.99).all()), f"lime vs exact Shapley values, per image: {r.tolist()}"


def test_contrast_explains_the_difference_of_two_logits():
    model = PatchAdditive(16, 16, (4, 4))
    x = torch.randn(2, 3, 16, 16)
    t, q = torch.tensor([0, 2]), torch.tensor([1, 0])
    shap = attribute(model, x, t, methods="shapley", contrast=q, shapley_grid=4, shapley_permutations=2)["shapley"]
    with torch.no_grad():
        exact = (model.weight[t] - model.weight[q]) * model.cell_means(x)  # baseline 0
    torch.testing.assert_close(pool(shap, 4), exact, atol=1e-5, rtol=1e-4)


def test_antithetic_pairs_and_lime_pieces():
    perms = antithetic_permutations(10, 5, torch.Generator().manual_seed(3))
    assert perms.shape == (5, 10)
    assert all(sorted(p.tolist()) == list(range(10)) for p in perms)
    assert torch.equal(perms[1], perms[0].flip(0)) and torch.equal(perms[3], perms[2].flip(0))
    # kernel: exp(-d^2 / (2 w^2)) on the cosine distance to the all-on mask
    z = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    d = torch.tensor([0.0, 0.5, 1.0])  # cos(1000, 1111) = 1 / 2
    torch.testing.assert_close(lime_kernel(z, 0.3), torch.exp(-d**2 / (2 * 0.09)))
    # the weighted ridge with an unpenalised intercept = scikit-learn's Ridge with sample weights
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(0)
    feats, y, w = (torch.rand(40, 6, generator=g) < 0.5).float(), torch.randn(40, 2, generator=g), torch.rand(40, generator=g)
    ours = ridge_fit(feats, y, w, ridge=0.7)
    for j in range(2):
        ref = Ridge(alpha=0.7).fit(feats.numpy(), y[:, j].numpy(), sample_weight=w.numpy()).coef_
        torch.testing.assert_close(ours[j], torch.as_tensor(ref, dtype=torch.float64), atol=1e-5, rtol=1e-5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Linear(16 * 64, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _shapes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """32-px images: noise, a bright square whose position gives the class, and a dimmer distractor."""
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    y = torch.randint(0, 3, (n,), generator=g)
    spots = torch.randint(0, 24, (n, 2), generator=g)
    for i in range(n):
        r, c = [(2, 2), (2, 18), (18, 10)][int(y[i])]
        x[i, :, r : r + 10, c : c + 10] += 1.0
        x[i, :, spots[i, 0] : spots[i, 0] + 6, spots[i, 1] : spots[i, 1] + 6] += 0.5
    return x, y


@pytest.fixture(scope="module")
def trained():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Net()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(40):
        x, y = _shapes(32, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _shapes(8, g)
    with torch.no_grad():
        t = model(x).argmax(1)
    assert (t == y).float().mean() >= 0.75, "the CNN should have learnt the task"
    return model, x, t


@pytest.mark.parametrize("baseline", [0.0, "mean"])
def test_shapley_matches_captum_shapley_value_sampling_on_a_trained_cnn(trained, baseline):
    from captum.attr import ShapleyValueSampling

    model, x, t = trained
    if baseline == "mean":  # fewer images for the second baseline (time)
        x, t = x[:4], t[:4]
    ours = attribute(model, x, t, methods="shapley", shapley_baseline=baseline)["shapley"]
    mask = cell_index(32, 32, 8)[None, None]
    ref = ShapleyValueSampling(model).attribute(x, baselines=baseline_images(x, baseline), target=t,
                                                feature_mask=mask, n_samples=16, perturbations_per_eval=64)
    r = pearson(pool(ours, 8), pool(ref[:, 0], 8))
    print(f"\nshapley vs captum ShapleyValueSampling (baseline {baseline!r}): mean per-image Pearson "
          f"{r.mean():.4f}, min {r.min():.4f}")
    assert r.mean() >= 0.95


def test_lime_agrees_with_captum_lime_on_the_same_cells(trained):
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    model, x, t = trained
    ours = attribute(model, x, t, methods="lime")["lime"]

    def kernel(original, perturbed, interpretable, **kwargs):  # ours: on the cell mask, width 0.25
        return lime_kernel(interpretable.float().reshape(1, -1), 0.25)[0]

    ref_lime = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=kernel)
    mask = cell_index(32, 32, 8)[None, None]
    ref = torch.cat([ref_lime.attribute(x[i : i + 1], baselines=0.0, target=t[i : i + 1], feature_mask=mask,
                                        n_samples=500, perturbations_per_eval=100)[:, 0] for i in range(len(x))])
    r = pearson(pool(ours, 8), pool(ref, 8))
    print(f"\nlime vs captum Lime (same cells, kernel and ridge; other masks): mean per-image Pearson "
          f"{r.mean():.4f}, min {r.min():.4f}")
    assert r.mean() >= 0.95  # measured 0.997 (the masks differ: two draws of the same estimator)


def test_private_generators_seeded_maps_and_the_global_state_untouched(trained):
    model, x, t = trained
    x = x[:3]
    opts = dict(shapley_permutations=4, lime_samples=64)
    state = torch.get_rng_state()
    first = attribute(model, x, t[:3], methods=("shapley", "lime"), **opts)
    assert torch.equal(torch.get_rng_state(), state)
    again = attribute(model, x, t[:3], methods=("shapley", "lime"), **opts)
    other = attribute(model, x, t[:3], methods=("shapley", "lime"), shapley_seed=1, lime_seed=1, **opts)
    for name in ("shapley", "lime"):
        assert torch.equal(first[name], again[name]), name
        assert not torch.allclose(first[name], other[name]), name


@pytest.mark.parametrize("options, match", [
    ({"shapley_baseline": "zeros"}, "shapley_baseline must be a number, 'mean'"),
    ({"shapley_grid": (2, 0)}, "shapley_grid must be a positive int"),
    ({"shapley_permutations": 0}, "shapley_permutations must be a positive int"),
    ({"shapley_seed": -1}, "shapley_seed must be an int >= 0"),
    ({"lime_kernel_width": 0}, "lime_kernel_width must be a number > 0"),
    ({"lime_ridge": -1.0}, "lime_ridge must be a number >= 0"),
    ({"lime_samples": 2.5}, "lime_samples must be a positive int"),
    ({"shapley_grid": 40}, "shapley_grid \\(40, 40\\) has more cells than the image has pixels"),
    ({"lime_sample": 5}, "did you mean 'lime_samples'"),
    ({"lime_samples": 2, "lime_ridge": 0.0}, "ridge fit is singular .* use lime_ridge > 0 or more lime_samples"),
])
def test_bad_options_say_the_fix(options, match):
    model = PatchAdditive(16, 16, (2, 2))
    with pytest.raises(ValueError, match=match):
        attribute(model, torch.rand(1, 3, 16, 16), methods=("shapley", "lime"), **options)
