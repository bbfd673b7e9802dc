"""Memory and disk that stay bounded (issue 11, point 7).

The audit sends the probe through the model in chunks (``batch_size``, 64 by default), in every pass: the shared
attribution pass, the methods' own passes and every metric that runs the model again, on the probe or on edited
copies of it. On a model whose output for an image does not depend on the other images of its batch, the chunk
size changes nothing: maps, per-image values, the summary and discovery's confirmation are the same as with the
whole probe at once, sharded or not.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from lightning_saliency import SaliencyMonitor
from lightning_saliency.audit import ALL_METRICS, DEFAULT_BATCH_SIZE, AuditSpec, audit_shard, merge, summarize
from lightning_saliency.probe import ProbeSet


def _net() -> nn.Module:
    """A conv net without BatchNorm in training mode or any batch statistic: each image's logits are its own."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def _probe(n: int = 14, size: int = 16) -> ProbeSet:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size, size, generator=g)
    spurious = torch.zeros(n, size, size, dtype=torch.bool)
    spurious[:, :4, :4] = True
    obj = torch.zeros(n, size, size, dtype=torch.bool)
    obj[:, 6:12, 6:12] = True
    x[:, :, :4, :4] += torch.arange(n).remainder(3).float().reshape(n, 1, 1, 1)  # a patch that codes the label
    return ProbeSet(x, torch.arange(n).remainder(3), groups=["a", "b"] * (n // 2), object_masks=obj,
                    spurious_masks=spurious)


METHODS = ("gradcam", "gradient", "input_x_gradient", "smoothgrad")


def _spec(batch_size: int | None, methods: tuple[str, ...] = METHODS) -> AuditSpec:
    # every metric, on subsets of 5 (stability: 5 x 4 noisy copies) so that a chunk of 3 splits every pass
    return AuditSpec(methods=methods, layer="2",
                     metrics=ALL_METRICS, batch_size=batch_size, stability_images=5, expensive_images=5,
                     method_options={"smoothgrad_samples": 4, "shapley_grid": 4, "shapley_permutations": 4,
                                     "lime_grid": 4, "lime_samples": 40})


def _same(a, b, probe: ProbeSet, spec: AuditSpec) -> None:
    assert set(a.maps) == set(b.maps) == set(spec.methods)
    for key, maps in a.maps.items():
        assert torch.allclose(maps, b.maps[key], atol=1e-6, rtol=1e-5), key
    assert torch.equal(a.predictions, b.predictions)
    assert set(a.per_image) == set(b.per_image)
    for key, values in a.per_image.items():
        assert torch.allclose(values, b.per_image[key], atol=1e-5, equal_nan=True), key
    sa, sb = summarize(a, probe, spec), summarize(b, probe, spec)
    assert set(sa) == set(sb)
    for key, value in sa.items():
        assert value == pytest.approx(sb[key], abs=1e-5, nan_ok=True), key


@pytest.fixture(scope="module")
def whole():
    probe, net = _probe(), _net()
    spec = _spec(None)
    return probe, net, audit_shard(net, probe, spec, on_error="raise")


def test_chunked_audit_equals_the_whole_probe_at_once(whole):
    probe, net, full = whole
    for name in ("stability", "max_sensitivity", "infidelity", "fragility", "spurious_flip_rate", "deletion_auc",
                 "shap_agreement", "randomization_similarity", "completeness_gap"):
        assert any(k.split("/")[1].startswith(name) and torch.isfinite(v).any() for k, v in full.per_image.items()), name
    chunked = audit_shard(net, probe, _spec(3), on_error="raise")
    _same(full, chunked, probe, _spec(3))


def test_sharded_and_chunked_audit_equals_the_whole_probe_at_once(whole):
    """Two shards of 7, each in chunks of 3 (boundaries that are not the whole probe's): the merged result is the
    unsharded, unchunked one (the subset metrics' images lie in the first shard, as under DDP). SmoothGrad
    included: its noise follows each image's position in the whole probe, not its place in the shard."""
    probe, net, full = whole
    spec = _spec(3)
    merged = merge([audit_shard(net, probe.shard(rank, 2), spec, full_probe=probe, on_error="raise")
                    for rank in (1, 0)])
    _same(full, merged, probe, spec)


def test_shards_that_split_the_subsets_draw_what_the_whole_probe_draws(whole):
    """Four shards of 4, 4, 3 and 3: the subset metrics' 5 images straddle the first two. Every random draw is
    keyed by the image's position in the whole probe (smoothgrad's noise, also on the noisy copies; stability's
    and max_sensitivity's copies; the RISE random ranking; infidelity's draws; fragility's signs; the agreement
    floor's random maps), so each image's values are the whole probe's. The calibrated agreement values too:
    the calibration divides by the mean ceiling and floor of the images scored together, a shard's before the
    merge (where they differ) and the whole probe's after it (``MetricSpec.merged``)."""
    probe, net, full = whole
    spec = _spec(3)
    shards = [probe.shard(rank, 4) for rank in range(4)]
    assert [s.indices.tolist()[:1] for s in shards] == [[0], [4], [8], [11]]
    parts = [audit_shard(net, s, spec, full_probe=probe, on_error="raise") for s in shards[::-1]]
    pooled = [k for k in full.per_image if k.endswith(("/shap_agreement", "/lime_agreement"))]
    assert pooled and any(k.endswith("/shap_agreement_tau_floor") for k in full.per_image)
    # a shard alone calibrates by its own images' references: not the whole probe's values
    first = next(r for r in parts if r.indices.tolist()[0] == 0)
    rows = first.indices
    assert any(not torch.allclose(first.per_image[k][rows < 5], full.per_image[k][rows[rows < 5]], atol=1e-4)
               for k in pooled)
    _same(full, merge(parts), probe, spec)


def test_discovery_confirmation_in_chunks_equals_the_whole_probe(whole, monkeypatch):
    """Confirmation pastes a candidate's region onto the other classes' images, random regions (its null) and the
    region from the class's other images, and erases it from its members: built and run a chunk at a time, the
    rates equal the whole probe's at once."""
    import lightning_saliency.discovery_audit as discovery_audit

    probe, net, full = whole
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:4, :4] = True
    found = {"candidates": [{"class": 0, "members": [0, 3, 6], "region": [0, 0, 4, 4], "mask": mask, "score": 0.5},
                            {"class": 1, "members": [1, 4], "region": [0, 0, 4, 4], "mask": mask, "score": 0.4}],
             "too_small": [], "clusters": {}, "n_clusters": {0: 2, 1: 2}}
    monkeypatch.setattr(discovery_audit, "discover", lambda *a, **k: found)
    ref, ref_metrics = discovery_audit.run_discovery(net, probe, full, "gradcam", {"null_draws": 3}, batch_size=None)
    assert all(c["recipients"] > 0 and math.isfinite(c["flip_rate"]) for c in ref["candidates"])
    for batch_size in (1, 4):
        section, metrics = discovery_audit.run_discovery(net, probe, full, "gradcam", {"null_draws": 3},
                                                         batch_size=batch_size)
        for a, b in zip(section["candidates"], ref["candidates"], strict=True):
            assert a["confirmed"] == b["confirmed"]
            for key in ("flip_rate", "null_flip_rate", "rest_flip_rate", "logit_gain", "null_logit_gain",
                        "rest_logit_gain", "erase_accuracy_drop"):
                assert a[key] == pytest.approx(b[key], abs=1e-5, nan_ok=True), key
        assert metrics == pytest.approx(ref_metrics, nan_ok=True)


def test_the_probe_goes_through_the_model_in_chunks_of_64_by_default():
    """A probe of 130 images: no forward of an audit at the default chunk size (maps, every metric, discovery)
    sees more than 64 images, also where a metric runs more than 64 (70 images, 20 x 4 noisy copies)."""
    seen: list[int] = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return self.net(x)

    g = torch.Generator().manual_seed(0)
    probe = ProbeSet(torch.rand(130, 3, 8, 8, generator=g), torch.arange(130).remainder(3),
                     groups=["a", "b"] * 65, spurious_masks=torch.rand(130, 8, 8, generator=g) > 0.8)
    monitor = SaliencyMonitor(probe, methods=("gradcam", "gradient"), layer="net.2")
    assert monitor.spec.batch_size == DEFAULT_BATCH_SIZE == AuditSpec().batch_size == 64
    spec = AuditSpec(methods=("gradcam", "gradient"), layer="net.2", metrics=ALL_METRICS, stability_images=20,
                     expensive_images=70, method_options={"shapley_permutations": 2, "lime_samples": 20})
    model = Counting()
    result = audit_shard(model, probe, spec, on_error="raise")
    assert len(result.maps["gradcam"]) == 130 and max(seen) == 64, sorted(set(seen))
    assert seen.count(64) > 10  # the metrics ran (and in chunks)
    from lightning_saliency.discovery_audit import run_discovery

    seen.clear()
    run_discovery(model, probe, result, "gradcam", {"min_class_size": 3}, batch_size=spec.batch_size)
    assert not seen or max(seen) <= 64


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_a_bad_batch_size_fails_when_the_monitor_is_built(bad):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        SaliencyMonitor(_probe(4), batch_size=bad)


def test_rank_and_pearson_in_blocks_equal_one_block(monkeypatch):
    """Drift ranks and correlates all N maps; it does so a block of rows at a time (bounded temporaries)."""
    from lightning_saliency.metrics import _common
    from lightning_saliency.metrics.stability import drift

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, 8, 8, generator=g), torch.rand(50, 8, 8, generator=g)
    a[3] = 0.0  # a constant map: its defined value survives the blocks
    b[3] = 0.0
    b[4] = 1.0
    with pytest.warns(UserWarning, match="1 pair"):
        one = drift(a, b)
    monkeypatch.setattr(_common, "BLOCK_ELEMENTS", 64 * 7)  # 7 maps of 64 pixels per block
    with pytest.warns(UserWarning, match="1 pair"):
        blocks = drift(a, b)
    assert torch.equal(one, blocks) and one[3] == 1.0 and one[4] == 0.0 and not math.isnan(float(one.sum()))


# -- keep_maps: the maps files on disk ---------------------------------------------------------------------------
def _maps_files(saliency) -> list[str]:
    return sorted(p.name for p in (saliency / "maps").glob("*.npz") if p.name != "probe.npz")


def _fit_keeping(tmp_path, keep_maps, epochs: int, **kwargs):
    from tests import monitor_utils as U

    monitor = SaliencyMonitor(U.probe(), methods=("gradcam", "gradient"), metrics=("spurious_mass",),
                              discover=False, log_images=0, keep_maps=keep_maps, dirpath=str(tmp_path / "saliency"))
    U.fit([monitor], tmp_path, max_epochs=epochs, logger=False, **kwargs)
    return monitor, tmp_path / "saliency"


def test_keep_maps_3_of_6_audits_keeps_first_last_and_one_between_and_the_page_shows_them(tmp_path):
    from lightning_saliency.cli import main
    from lightning_saliency.report import load_maps, load_report

    monitor, saliency = _fit_keeping(tmp_path, 3, 6)
    assert len(monitor.history) == 6
    assert _maps_files(saliency) == ["epoch_0000.npz", "epoch_0002.npz", "epoch_0005.npz"]
    audits = load_report(saliency).audits
    assert [a["epoch"] for a in audits] == list(range(6))
    assert [a["maps"] for a in audits] == ["maps/epoch_0000.npz", None, "maps/epoch_0002.npz", None, None,
                                           "maps/epoch_0005.npz"]
    assert [a.get("maps_thinned") for a in audits if not a["maps"]] == \
        ["maps/epoch_0001.npz", "maps/epoch_0003.npz", "maps/epoch_0004.npz"]  # the report says which went
    assert all(load_maps(saliency / a["maps"])["gradcam"].shape[0] == 8 for a in audits if a["maps"])
    page = tmp_path / "audit.html"
    assert main(["report", str(saliency), "-o", str(page)]) == 0
    html = page.read_text()
    slider = re.search(r'<input type="range" id="epoch-slider" min="0" max="(\d+)"[^>]*data-epochs="([^"]*)"', html)
    assert slider is not None and slider.groups() == ("2", "0,2,5")  # the slider: the three audits with maps
    assert "3 of 3 audited epochs with maps" in html and "3 audits' maps files were thinned by keep_maps" in html
    assert "not found" not in html
    assert main(["show", str(saliency)]) == 0


def test_keep_maps_none_keeps_every_file_and_the_default_is_documented(tmp_path):
    from lightning_saliency.mapfiles import KEEP_MAPS

    monitor, saliency = _fit_keeping(tmp_path, None, 3)
    assert _maps_files(saliency) == ["epoch_0000.npz", "epoch_0001.npz", "epoch_0002.npz"]
    assert SaliencyMonitor(_probe(4))._recorder.keep_maps == KEEP_MAPS == 20
    assert f"keep_maps: at most this many audits keep their maps files ({KEEP_MAPS};" in SaliencyMonitor.__doc__


@pytest.mark.parametrize("bad", [0, 1, -2, 2.5, True, "3"])
def test_a_bad_keep_maps_fails_when_the_monitor_is_built(bad):
    with pytest.raises(ValueError, match="keep_maps must be an int >= 2"):
        SaliencyMonitor(_probe(4), keep_maps=bad)


def test_a_crash_while_thinning_leaves_a_valid_set_and_the_next_thinning_finishes_it(tmp_path, monkeypatch):
    """The report that no longer points at a file is written before the file goes: killed in between, the folder
    holds one file too many and a report every path of which opens; the next audit's thinning deletes it."""
    from lightning_saliency import recording
    from lightning_saliency.report import load_maps, load_report

    class Killed(BaseException):  # not an Exception: nothing on the way may catch it, as with a SIGKILL
        pass

    def killed(*args, **kwargs):
        raise Killed("killed while deleting a maps file")

    monkeypatch.setattr(recording, "remove_maps_file", killed)
    with pytest.raises(Killed):
        _fit_keeping(tmp_path, 2, 3)
    audits = load_report(tmp_path / "saliency").audits
    assert [a["maps"] for a in audits] == ["maps/epoch_0000.npz", None, "maps/epoch_0002.npz"]
    assert all(load_maps(tmp_path / "saliency" / a["maps"]) for a in audits if a["maps"])  # every path opens
    assert _maps_files(tmp_path / "saliency") == ["epoch_0000.npz", "epoch_0001.npz", "epoch_0002.npz"]
    monkeypatch.undo()
    recorder = recording.Recorder(dirpath=str(tmp_path / "saliency"), keep_maps=2)
    recorder.directory, recorder.report = str(tmp_path / "saliency"), load_report(tmp_path / "saliency")
    recorder.report_on_disk = True
    recorder._remove(recorder._thin(recorder.report))
    assert _maps_files(tmp_path / "saliency") == ["epoch_0000.npz", "epoch_0002.npz"]


def test_a_resumed_run_does_not_point_at_thinned_files(tmp_path):
    """The checkpoint's history still names the maps files that were thinned after its audits: the resumed
    report names only files that exist."""
    import pytorch_lightning as pl

    from lightning_saliency.report import load_report

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    from tests import monitor_utils as U

    def monitor():
        return SaliencyMonitor(U.probe(), methods=("gradient",), metrics=("spurious_mass",), discover=False,
                               log_images=0, keep_maps=2, dirpath=str(tmp_path / "saliency"))

    U.fit([monitor(), ckpt], tmp_path, max_epochs=4, logger=False, enable_checkpointing=True)
    # resumed with nothing left to train: the report is the checkpoint's history, written again at the start
    U.fit([monitor()], tmp_path, max_epochs=4, logger=False, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    audits = load_report(tmp_path / "saliency").audits
    assert [a["maps"] for a in audits] == ["maps/epoch_0000.npz", None, None, "maps/epoch_0003.npz"]
    U.fit([monitor()], tmp_path, max_epochs=6, logger=False, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    audits = load_report(tmp_path / "saliency").audits
    assert [a["epoch"] for a in audits] == list(range(6))
    kept = [a["maps"] for a in audits if a["maps"]]
    assert kept == ["maps/epoch_0000.npz", "maps/epoch_0005.npz"]
    assert all((tmp_path / "saliency" / m).is_file() for m in kept)
    assert _maps_files(tmp_path / "saliency") == ["epoch_0000.npz", "epoch_0005.npz"]
