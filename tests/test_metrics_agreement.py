"""``shap_agreement`` and ``lime_agreement`` (metrics/agreement.py and their registry rows): Kendall τ-b against
SciPy, top-k agreement by hand, the random floor against its expectation, the calibration and its undefined
case, one reference run per audit, and a monitor fit writing finite values for every method."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from scipy.stats import kendalltau

from lightning_saliency import SaliencyMonitor
from lightning_saliency.audit import AuditSpec, audit_shard, summarize
from lightning_saliency.metrics import (
    UndefinedMetricWarning,
    agreement,
    calibrate,
    kendall_tau,
    random_floor,
    topk_agreement,
)
from lightning_saliency.probe import ProbeSet
from tests import monitor_utils as U

KEYS = ("", "_tau", "_topk", "_tau_ceiling", "_tau_floor", "_topk_ceiling", "_topk_floor")


def test_kendall_tau_is_scipy_s_tau_b_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 20), generator=g).float()  # many ties
    b = torch.randint(0, 5, (6, 20), generator=g).float()
    b[0] = a[0] * 2 + 1  # the same ranking
    b[1] = -a[1]  # the reverse
    ours = kendall_tau(a, b)
    ref = torch.tensor([kendalltau(a[i].numpy(), b[i].numpy()).statistic for i in range(6)], dtype=torch.float32)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert ours[0] == 1.0 and ours[1] == -1.0
    with pytest.warns(UndefinedMetricWarning, match="constant map"):
        tau = kendall_tau(torch.stack([torch.zeros(20), a[2]]), b[:2])
    assert math.isnan(tau[0]) and tau[1] == kendall_tau(a[2:3], b[1:2])[0]


def test_topk_agreement_counts_the_shared_top_cells():
    a = torch.tensor([[9.0, 8, 7, 6, 1, 2, 3, 4]])
    b = torch.tensor([[9.0, 1, 7, 2, 8, 3, 4, 5]])  # top-3 of a: {0, 1, 2}; of b: {0, 4, 2}
    assert topk_agreement(a, b, k=3).item() == pytest.approx(2 / 3)
    assert topk_agreement(a, a, k=3).tolist() == [1.0]
    # ties broken by position: b's top-2 are cell 3, then cell 0 of the three tied ones
    assert topk_agreement(torch.tensor([[5.0, 0, 4, 1]]), torch.tensor([[1.0, 1, 1, 1.001]]), k=2).item() == 0.5
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(topk_agreement(torch.ones(1, 8), a, k=3).item())
    with pytest.raises(ValueError, match="k must be an int in \\[1, 8\\]"):
        topk_agreement(a, b, k=9)


def test_random_floor_is_chance():
    ref = torch.rand(3, 64, generator=torch.Generator().manual_seed(1))
    floor = random_floor(ref, k=8, draws=400, seed=0)
    assert floor["tau"].abs().max() < 0.02  # E[tau] = 0
    assert (floor["topk"] - 8 / 64).abs().max() < 0.02  # E[|A ∩ B|] / k = k / cells
    assert torch.equal(random_floor(ref, seed=3)["tau"], random_floor(ref, seed=3)["tau"])


def test_calibration_maps_floor_to_0_ceiling_to_1_and_is_null_when_they_meet():
    raw, ceiling, floor = torch.tensor([0.1, 0.5, 0.9, 1.0]), torch.tensor([0.8, 1.0, 0.9, 0.9]), torch.full((4,), 0.1)
    out = calibrate(raw, ceiling, floor)
    torch.testing.assert_close(out, (raw - 0.1) / (0.9 - 0.1))
    assert math.isclose(float(out.mean()), (float(raw.mean()) - 0.1) / 0.8, rel_tol=1e-6)  # mean of the calibrated
    with pytest.warns(UndefinedMetricWarning, match="calibration undefined"):
        assert torch.isnan(calibrate(raw, torch.full((4,), 0.12), floor)).all()
    with pytest.warns(UndefinedMetricWarning):
        assert torch.isnan(calibrate(raw, torch.full((4,), math.nan), floor)).all()


def test_agreement_puts_raw_values_and_both_references_together():
    g = torch.Generator().manual_seed(2)
    ref = torch.rand(5, 64, generator=g)
    again = ref + 0.3 * torch.rand(5, 64, generator=g)
    out = agreement(ref, ref, again, k=8, seed=0)
    assert set(out) == {"value", "tau", "topk", "tau_ceiling", "tau_floor", "topk_ceiling", "topk_floor"}
    assert torch.equal(out["tau"], torch.ones(5)) and torch.equal(out["topk"], torch.ones(5))
    torch.testing.assert_close(out["tau_ceiling"], kendall_tau(again, ref))
    for m in ("tau", "topk"):
        c, f = out[f"{m}_ceiling"].mean(), out[f"{m}_floor"].mean()
        assert c > f + 0.2
    expected = ((1 - out["tau_floor"].mean()) / (out["tau_ceiling"].mean() - out["tau_floor"].mean())
                + (1 - out["topk_floor"].mean()) / (out["topk_ceiling"].mean() - out["topk_floor"].mean())) / 2
    torch.testing.assert_close(out["value"], expected.expand(5))


def _probe(n: int = 6):
    torch.manual_seed(0)
    return ProbeSet(torch.rand(n, 3, 16, 16), torch.randint(0, 3, (n,)))


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 256, 3))


OPTS = {"shapley_grid": 4, "shapley_permutations": 4, "lime_grid": 4, "lime_samples": 64}


@pytest.mark.parametrize("audited", [True, False])
def test_the_reference_runs_once_per_audit_and_scores_itself_by_its_second_seed(monkeypatch, audited):
    calls = []
    original = AuditSpec.explain

    def counting(self, model, inputs, targets, methods=None):
        calls.append((tuple(methods or self.methods), self.method_options.get("shapley_seed")))
        return original(self, model, inputs, targets, methods)

    monkeypatch.setattr(AuditSpec, "explain", counting)
    methods = ("gradient", "input_x_gradient") + (("shapley",) if audited else ())
    spec = AuditSpec(methods=methods, metrics=("shap_agreement",), method_options={**OPTS, "shapley_seed": 5})
    probe = _probe()
    result = audit_shard(_net(), probe, spec, on_error="raise")
    # the reference with the next seed, plus the audit's own seed when shapley is not audited: never per method
    assert calls == [(("shapley",), 6)] if audited else calls == [(("shapley",), 5), (("shapley",), 6)]
    for m in methods:
        for suffix in KEYS:
            values = result.per_image[f"{m}/shap_agreement{suffix}"]
            assert values.shape == (6,) and torch.isfinite(values).all(), (m, suffix)
    if audited:  # the reference against itself: its raw values are the ceiling
        for measure in ("tau", "topk"):
            assert torch.equal(result.per_image[f"shapley/shap_agreement_{measure}"],
                               result.per_image[f"shapley/shap_agreement_{measure}_ceiling"])
        # calibrated with the mean references, so its mean (the reported value) is 1
        assert float(result.per_image["shapley/shap_agreement"].mean()) == pytest.approx(1.0)
    summary = summarize(result, probe, spec)
    assert summary["gradient/shap_agreement_tau_ceiling"] == summary["input_x_gradient/shap_agreement_tau_ceiling"]


def test_a_model_that_ignores_its_input_gives_null_not_a_score():
    class Blind(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3, 1, 1))

        def forward(self, x):
            return (x * self.w).mean((2, 3)) + torch.tensor([1.0, 2.0, 3.0])

    spec = AuditSpec(methods=("gradient",), metrics=("lime_agreement",), method_options=OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        result = audit_shard(Blind(), _probe(), spec, on_error="raise")
    for suffix in ("", "_tau", "_topk", "_tau_ceiling", "_topk_ceiling"):
        assert torch.isnan(result.per_image[f"gradient/lime_agreement{suffix}"]).all(), suffix


def test_monitor_fit_writes_finite_agreement_and_fragility_values_for_every_method(tmp_path):
    methods = ("gradcam", "gradient", "integrated_gradients", "shapley", "lime")
    monitor = SaliencyMonitor(U.probe(), methods=methods,
                              metrics=("spurious_mass", "shap_agreement", "lime_agreement", "fragility"),
                              expensive_every_n_audits=1,
                              method_options={"shapley_permutations": 4, "lime_samples": 100, "ig_steps": 4})
    trainer, _ = U.fit([monitor], tmp_path, max_epochs=2)
    with open(os.path.join(trainer.log_dir, "saliency", "report.json")) as f:
        report = json.load(f)
    assert len(report["audits"]) == 2
    for audit in report["audits"]:
        assert not audit["errors"]
        for m in methods:
            for metric in ("shap_agreement", "lime_agreement"):
                for suffix in KEYS:
                    value = audit["metrics"][f"{m}/{metric}{suffix}"]
                    assert value is not None and math.isfinite(value), f"{m}/{metric}{suffix}"
            for key in (f"{m}/fragility", f"{m}/fragility_random"):  # the attack, or the search, and its control
                assert 0.0 <= audit["metrics"][key] <= 1.0, key
        assert audit["metrics"]["shapley/shap_agreement"] == pytest.approx(1.0)
        assert audit["metrics"]["lime/lime_agreement"] == pytest.approx(1.0)
        # shapley vs lime's reference and lime vs shapley's compare the same two maps (tau is symmetric)
        assert audit["metrics"]["shapley/lime_agreement_tau"] == pytest.approx(
            audit["metrics"]["lime/shap_agreement_tau"], abs=1e-6)


def test_bench_metrics_prints_the_agreement_metrics_as_multiples_of_the_maps(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_metrics.py"
    spec = importlib.util.spec_from_file_location("bench_metrics", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--images", "1", "--size", "16", "--repeats", "1", "--threads", "1",
                    "--only", "shap_agreement,lime_agreement"])
    finally:
        torch.set_num_threads(threads)
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| metric", "| ---"))}
    assert set(rows) == {"maps (gradcam + gradient)", "shap_agreement", "lime_agreement"}
    assert float(rows["maps (gradcam + gradient)"]) == 1.0
    assert float(rows["shap_agreement"]) > 1.0 and float(rows["lime_agreement"]) > 1.0  # "x maps"
