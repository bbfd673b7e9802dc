"""Outputs and tasks (lightning_saliency.tasks): which tensor of a model's output is explained, and how a task
turns it into one differentiable score per row; through attribute() for every method."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_saliency import attribute
from lightning_saliency.methods.registry import builtin_names
from lightning_saliency.tasks import TaskModel, get_task, infer_task, output_adapter

FAST = dict(smoothgrad_samples=2, ig_steps=4, occlusion_patch=4, occlusion_stride=4, shapley_grid=2,
            shapley_permutations=2, lime_grid=2, lime_samples=20)


def _cnn(classes: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, classes))


def _x(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class _ModelOutput(OrderedDict):
    """What a Hugging Face ``ModelOutput`` is: an ordered dict whose values are attributes too."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class _Logits:
    """A plain object with ``.logits`` (not a dict)."""

    def __init__(self, logits):
        self.logits, self.hidden = logits, logits * 0


class Wrapped(nn.Module):
    def __init__(self, net: nn.Module, form: str):
        super().__init__()
        self.net, self.form = net, form

    def forward(self, x):
        y = self.net(x)
        return {
            "dict_logits": lambda: {"aux": y * 2, "logits": y},
            "dict_out": lambda: {"out": y, "aux": y * 0},
            "tuple": lambda: (y, x.mean()),
            "list": lambda: [y, y * 3],
            "model_output": lambda: _ModelOutput(loss=None, logits=y),
            "object": lambda: _Logits(y),
            "key": lambda: {"scores": y, "logits": y * 5},
            "callable": lambda: {"heads": [y * 7, y]},
        }[self.form]()


OUTPUTS = {"key": "scores", "callable": lambda out: out["heads"][1]}


# ------------------------------------------------------------------------------------------------ adapter


def test_the_default_adapter_picks_a_tensor_the_first_element_logits_then_out_then_dot_logits():
    t = torch.ones(2, 3)
    a = output_adapter(None)
    assert a(t) is t and a.picked == "tensor"
    assert a((t, 1)) is t and a.picked == "first element"
    assert a([t, t * 2]) is t
    assert a({"out": t * 2, "logits": t}) is t and a.picked == "key 'logits'"  # "logits" before "out"
    assert a({"aux": t * 2, "out": t}) is t and a.picked == "key 'out'"
    assert a(_Logits(t)) is t and a.picked == "attribute 'logits'"
    assert a(_ModelOutput(logits=t)) is t


def test_a_dict_without_logits_or_out_is_an_error_listing_its_keys_and_naming_output():
    with pytest.raises(ValueError, match=r"keys \['a', 'b'\].*output="):
        output_adapter(None)({"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(ValueError, match="output="):
        output_adapter(None)("not a tensor")
    with pytest.raises(ValueError, match=r"output='x'.*keys are \['a'\]"):
        output_adapter("x")({"a": torch.ones(1)})
    with pytest.raises(ValueError, match="not a tensor"):
        output_adapter(lambda out: 3)(torch.ones(1))
    with pytest.raises(ValueError, match="output= must be"):
        output_adapter(3)


def test_a_string_picks_a_key_or_an_attribute_and_a_callable_maps_the_output():
    t = torch.ones(2)
    assert output_adapter("hidden")(_Logits(t)).sum() == 0
    assert output_adapter("aux")({"aux": t, "logits": t * 0}) is t
    assert output_adapter(lambda out: out[1])((t * 0, t)) is t


@pytest.mark.parametrize("form", ["dict_logits", "dict_out", "tuple", "list", "model_output", "object", "key",
                                  "callable"])
def test_every_method_explains_a_model_whose_output_is_not_a_tensor_exactly_as_the_plain_model(form):
    net, x = _cnn(), _x()
    methods = builtin_names()
    ref = attribute(net, x, methods=methods, layer="1", **FAST)
    maps, info = attribute(Wrapped(net, form), x, methods=methods, layer="net.1", output=OUTPUTS.get(form),
                           return_info=True, **FAST)
    assert list(maps) == list(methods)
    for m in methods:
        assert tuple(maps[m].shape) == (3, 8, 8) and bool(torch.isfinite(maps[m]).all())
        torch.testing.assert_close(maps[m], ref[m], msg=m)
    assert info.task == "multiclass" and info.task_inferred


def test_a_dict_model_without_known_keys_is_an_error_naming_output_in_attribute():
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _cnn()

        def forward(self, x):
            return {"scores": self.net(x)}

    with pytest.raises(ValueError, match=r"keys \['scores'\].*output="):
        attribute(Scores(), _x(), methods="gradient")


# ------------------------------------------------------------------------------------------------ tasks


def test_infer_task_from_output_and_target_shapes():
    assert infer_task(torch.zeros(4, 1), torch.tensor([0, 1, 1, 0])).name == "binary"
    assert infer_task(torch.zeros(4)).name == "binary"
    assert infer_task(torch.zeros(4, 3), torch.tensor([0, 2, 1, 0])).name == "multiclass"
    assert infer_task(torch.zeros(2, 3), torch.tensor([[1.0, 1, 0], [0, 0, 1]])).name == "multilabel"
    assert infer_task(torch.zeros(2, 3, 4, 4)).name == "segmentation"
    with pytest.raises(ValueError, match="task='multilabel'.*task='multiclass'"):
        infer_task(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 1]]))  # one-hot: ambiguous
    with pytest.raises(ValueError, match="task='binary'.*other than 0 and 1"):
        infer_task(torch.zeros(3, 1), torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="output=.*task="):
        infer_task(torch.zeros(2, 5, 7))


def test_a_task_that_does_not_fit_the_output_or_a_misspelt_task_is_an_error_naming_task():
    with pytest.raises(ValueError, match="task='binary' needs.*multiclass"):
        attribute(_cnn(3), _x(), methods="gradient", task="binary")
    with pytest.raises(ValueError, match="task='segmentation' needs"):
        attribute(_cnn(3), _x(), methods="gradient", task="segmentation")
    with pytest.raises(ValueError, match="Did you mean 'multiclass'"):
        attribute(_cnn(3), _x(), methods="gradient", task="multiclas")
    with pytest.raises(ValueError, match=r"targets\[1\] = 2 is out of range \[0, 2\) for task='binary'"):
        attribute(_cnn(1), _x(2), torch.tensor([0, 2]), methods="gradient", task="binary")


class Linear1(nn.Module):
    """z = w . x + b on the flattened image: every input gradient of z is w, exactly."""

    def __init__(self, squeeze: bool):
        super().__init__()
        self.fc, self.squeeze = nn.Linear(3 * 8 * 8, 1), squeeze
        with torch.no_grad():
            self.fc.weight.copy_(torch.linspace(-1, 1, 3 * 8 * 8).reshape(1, -1))
            self.fc.bias.fill_(0.25)

    def forward(self, x):
        z = self.fc(x.flatten(1))
        return z[:, 0] if self.squeeze else z


@pytest.mark.parametrize("squeeze", [False, True], ids=["N1", "N"])
def test_binary_target_1_explains_the_logit_and_target_0_its_negation(squeeze):
    model, x = Linear1(squeeze), _x(2)
    w = model.fc.weight.detach().reshape(3, 8, 8)
    z = model(x).reshape(-1).detach()
    for t, sign in ((1, 1.0), (0, -1.0)):
        maps, info = attribute(model, x, torch.tensor([t, t]), methods=("input_x_gradient", "integrated_gradients"),
                               ig_steps=4, return_info=True)
        assert info.task == "binary" and info.task_inferred
        torch.testing.assert_close(info.scores, sign * z)
        # the input gradient is +-W: input x gradient = sign * sum_c x * W; IG of a linear model is the same
        torch.testing.assert_close(maps["input_x_gradient"], sign * (x * w).sum(1))
        torch.testing.assert_close(maps["integrated_gradients"], sign * (x * w).sum(1), atol=1e-5, rtol=1e-5)
    # no target: the prediction (z > 0) is explained, so the score is |z|
    _, info = attribute(model, x, methods="gradient", return_info=True)
    assert info.targets.tolist() == (z > 0).long().tolist()
    torch.testing.assert_close(info.scores, z.abs())


def test_binary_cam_uses_the_signed_head_row_and_matches_gradcam_on_a_gap_linear_model():
    net, x = _cnn(1), _x(4)
    for t in (0, 1):
        maps = attribute(net, x, torch.full((4,), t), methods=("cam", "gradcam"), layer="1")
        cam, grad = maps["cam"], maps["gradcam"]
        assert bool((cam.flatten(1).amax(1) > 0).any())
        # GAP + linear: Grad-CAM's weights are W[c] / (h w), so the two maps are proportional
        torch.testing.assert_close(cam / 64.0, grad, atol=1e-6, rtol=1e-4)


class Seg(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return {"out": self.head(self.body(x)), "aux": None}


def test_segmentation_scores_a_class_by_its_logits_over_the_pixels_predicted_as_it():
    model, x = Seg(), _x(3)
    logits = model(x)["out"].detach()
    pred = logits.argmax(1)
    maps, info = attribute(model, x, torch.tensor([0, 1, 2]), methods=("gradcam", "gradient"), layer="body.1",
                           return_info=True)
    assert info.task == "segmentation" and info.task_inferred and info.output == "key 'out'"
    expected = torch.stack([(logits[i, c] * (pred[i] == c)).sum() for i, c in enumerate((0, 1, 2))])
    torch.testing.assert_close(info.scores, expected)
    for m in maps.values():
        assert tuple(m.shape) == (3, 8, 8) and bool(torch.isfinite(m).all())
    # a class predicted on no pixel has score 0 and an all-zero map; the others do not
    predicted_somewhere = torch.stack([(pred[i] == c).any() for i, c in enumerate((0, 1, 2))])
    assert (maps["gradient"].flatten(1).amax(1) > 0).tolist() == predicted_somewhere.tolist()
    assert not bool(predicted_somewhere.all())  # the case is covered
    # no target: the class predicted on the most pixels
    _, info = attribute(model, x, methods="gradient", return_info=True)
    counts = torch.nn.functional.one_hot(pred, 3).sum((1, 2))
    assert info.targets.tolist() == counts.argmax(1).tolist()
    # CAM has no linear head here: a clear error saying what to use
    with pytest.raises(ValueError, match="gradcam"):
        attribute(model, x, methods="cam", layer="body.1")


def test_multilabel_explains_one_label_logit_and_its_confidence_is_the_sigmoid():
    net, x = _cnn(4), _x(2)
    logits = net(x).detach()
    _, info = attribute(net, x, torch.tensor([3, 1]), methods="gradient", task="multilabel", return_info=True)
    assert info.task == "multilabel" and not info.task_inferred
    torch.testing.assert_close(info.scores, torch.stack([logits[0, 3], logits[1, 1]]))
    torch.testing.assert_close(get_task("multilabel").probabilities(logits), torch.sigmoid(logits))


def test_a_task_model_returns_the_class_score_matrix_and_attribute_sees_through_it():
    model, x = Linear1(True), _x(2)
    wrapped = TaskModel(model, task="binary")
    z = model(x).detach()
    torch.testing.assert_close(wrapped(x).detach(), torch.stack([-z, z], 1))
    torch.testing.assert_close(wrapped.probabilities(x).detach()[:, 1], torch.sigmoid(z))
    a = attribute(wrapped, x, torch.tensor([0, 1]), methods="input_x_gradient")
    b = attribute(model, x, torch.tensor([0, 1]), methods="input_x_gradient", task="binary")
    torch.testing.assert_close(a["input_x_gradient"], b["input_x_gradient"])


# ------------------------------------------------------------------------------------------------ metrics


def _binary_cnn() -> nn.Module:
    return Wrapped(_cnn(1), "dict_logits")


ALL_METRICS_FAST = dict(smoothgrad_samples=2, ig_steps=4, shapley_grid=2, shapley_permutations=2, lime_grid=2,
                        lime_samples=20)


@pytest.mark.parametrize("case", ["dict_multiclass", "binary", "segmentation"])
def test_every_metric_runs_per_task_through_the_audit(case):
    from lightning_saliency.audit import AuditSpec, audit_shard, summarize
    from lightning_saliency.metrics.registry import metric_names
    from lightning_saliency.probe import ProbeSet

    x = _x(4)
    model = {"dict_multiclass": lambda: Wrapped(_cnn(3), "model_output"), "binary": _binary_cnn,
             "segmentation": Seg}[case]()
    layer = "body.1" if case == "segmentation" else "net.1"
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[:, :3] = True
    probe = ProbeSet(x, torch.tensor([0, 1, 1, 0]), groups=["a", "b", "a", "b"], spurious_masks=masks,
                     object_masks=~masks)
    spec = AuditSpec(methods=("gradcam", "gradient", "integrated_gradients"), metrics=metric_names(), layer=layer,
                     target="label", method_options=ALL_METRICS_FAST, expensive_images=2, stability_images=2,
                     stability_k=2)
    result = audit_shard(model, probe, spec, on_error="raise")
    metrics = summarize(result, probe, spec)
    for name in ("deletion_auc", "insertion_auc", "infidelity", "stability", "randomization_similarity",
                 "fragility", "shap_agreement", "spurious_mass", "attention_disparity"):
        assert f"gradient/{name}" in metrics, name
    assert "integrated_gradients/completeness_gap" in metrics
    assert result.errors == []
    for key in ("gradient/deletion_auc", "gradient/insertion_auc", "gradient/spurious_mass"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["probe/accuracy"] == pytest.approx(float((result.predictions == probe.targets).float().mean()))


def test_binary_deletion_curve_starts_at_the_sigmoid_of_the_explained_logit():
    from lightning_saliency.metrics import deletion_auc

    model, x = Linear1(True), _x(2)
    z = model(x).detach()
    t = torch.tensor([1, 0])
    r = deletion_auc(TaskModel(model, task="binary"), x, t, torch.rand(2, 8, 8), steps=4, random_reference=False)
    torch.testing.assert_close(r["curve"][:, 0], torch.stack([torch.sigmoid(z[0]), 1 - torch.sigmoid(z[1])]))


# ------------------------------------------------------------------------------------------------ monitor


class _Net(__import__("pytorch_lightning").LightningModule):
    """A 16-px CNN trained on a pattern: ``form`` "dict" returns ``{"logits": [N, 3], "features": ...}``,
    "binary" one logit ``[N, 1]``, "scores" ``{"scores": [N, 3]}`` (needs ``output="scores"``)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        torch.manual_seed(0)
        classes = {"binary": 1, "multilabel": 4}.get(form, 3)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(32, 3, 16, 16, generator=g)
        self.y = torch.arange(32) % (2 if form == "binary" else 3)
        self.x[:, 0] += self.y.view(-1, 1, 1).float()
        if form == "multilabel":  # label k present when channel k % 3 is bright in quadrant k
            self.y = (torch.rand(32, 4, generator=g) < 0.5).float()
            self.y[:, 0] = 1.0  # every image has at least one label
            for k in range(4):
                self.x[:, k % 3, (k // 2) * 8:(k // 2) * 8 + 8, (k % 2) * 8:(k % 2) * 8 + 8] += self.y[:, k, None, None]

    def forward(self, x):
        h = self.body(x)
        y = self.head(h)
        return {"dict": {"features": h, "logits": y}, "binary": y, "scores": {"scores": y}, "multilabel": y}[self.form]

    def training_step(self, batch, _):
        x, y = batch
        if self.form == "binary":
            return nn.functional.binary_cross_entropy_with_logits(self(x)[:, 0], y.float())
        if self.form == "multilabel":
            return nn.functional.binary_cross_entropy_with_logits(self(x), y)
        out = self(x)
        return nn.functional.cross_entropy(out["logits"] if self.form == "dict" else out["scores"], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=16)


def _monitor_fit(tmp_path, form: str, **kwargs):
    import json

    import pytorch_lightning as pl

    from lightning_saliency import ProbeSet, SaliencyMonitor

    net = _Net(form)
    probe = ProbeSet(net.x[:8], net.y[:8])
    monitor = SaliencyMonitor(probe, methods=("gradcam", "gradient", "cam"), layer="body.1",
                              metrics=("stability", "drift", "deletion_auc"), expensive_every_n_audits=1,
                              dirpath=str(tmp_path / "saliency"), log_images=2, **kwargs)
    trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(net)
    with open(tmp_path / "saliency" / "report.json") as f:
        return json.load(f)


@pytest.mark.parametrize("form,kwargs,task", [("dict", {}, "multiclass"), ("binary", {}, "binary"),
                                              ("scores", {"output": "scores"}, "multiclass")])
def test_a_two_epoch_monitor_fit_writes_a_report_with_metrics_and_no_errors(tmp_path, form, kwargs, task):
    report = _monitor_fit(tmp_path, form, **kwargs)
    assert report["config"]["task"] == task and report["config"]["task_inferred"] is True
    assert [a["epoch"] for a in report["audits"]] == [0, 1]
    for audit in report["audits"]:
        assert audit["errors"] == []
        m = audit["metrics"]
        for key in ("gradcam/stability", "gradient/stability", "cam/deletion_auc", "probe/accuracy"):
            assert m[key] is not None and math.isfinite(m[key]), key
        assert 0 <= m["probe/accuracy"] <= 1
    assert report["audits"][-1]["metrics"]["gradient/drift"] is not None


def test_the_monitor_records_a_task_passed_explicitly_and_fails_at_setup_on_one_that_does_not_fit(tmp_path):
    report = _monitor_fit(tmp_path / "a", "binary", task="binary")
    assert report["config"]["task"] == "binary" and report["config"]["task_inferred"] is False
    with pytest.raises(ValueError, match=r"SaliencyMonitor: task='binary' needs"):
        _monitor_fit(tmp_path / "b", "dict", task="binary")
    with pytest.raises(ValueError, match=r"SaliencyMonitor: .*keys \['scores'\].*output="):
        _monitor_fit(tmp_path / "c", "scores")
    from lightning_saliency import SaliencyMonitor

    with pytest.raises(ValueError, match="Did you mean 'binary'"):
        SaliencyMonitor(None, task="binar")


# ------------------------------------------------------------------------------------------------ multi-label


def test_a_multi_hot_probe_explains_each_positive_label_of_an_image_as_its_own_row():
    from lightning_saliency.probe import ProbeSet

    labels = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]])
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[2, :2] = True
    x = _x(3)
    probe = ProbeSet(x, labels, groups=["a", "b", "c"], spurious_masks=masks)
    assert len(probe) == 6 and probe.targets.tolist() == [0, 1, 2, 0, 2, 3]
    assert probe.groups == ["a", "a", "b", "c", "c", "c"]
    assert torch.equal(probe.inputs[4], x[2]) and torch.equal(probe.spurious_masks[5], masks[2])
    assert probe.labels.tolist() == labels.bool()[[0, 0, 1, 2, 2, 2]].tolist()
    assert ProbeSet.from_state_dict(probe.state_dict()).fingerprint == probe.fingerprint
    assert probe.shard(1, 2).labels.shape == (3, 4)
    net = _cnn(4)
    maps = attribute(net, probe.inputs, probe.targets, methods="gradient", task="multilabel")["gradient"]
    one = attribute(net, x[2:3], torch.tensor([3]), methods="gradient", task="multilabel")["gradient"]
    torch.testing.assert_close(maps[5:6], one)
    assert not torch.allclose(maps[3], maps[5])  # two labels of one image: two different maps
    with pytest.raises(ValueError, match="multi-hot labels"):
        ProbeSet(x, torch.tensor([[0.2, 0.8, 0, 0]] * 3))


def test_multilabel_probe_accuracy_is_per_label_accuracy_and_f1_over_images():
    from lightning_saliency.audit import AuditSpec, audit_shard, summarize
    from lightning_saliency.probe import ProbeSet

    net, x = _cnn(4), _x(3)
    labels = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]])
    probe = ProbeSet(x, labels)
    spec = AuditSpec(methods=("gradient",), metrics=("stability",), task="multilabel", target="label")
    result = audit_shard(net, probe, spec, on_error="raise")
    metrics = summarize(result, probe, spec)
    pred, truth = net(x).detach() > 0, labels.bool()  # per image, each image once
    assert metrics["probe/accuracy"] == pytest.approx(float((pred == truth).float().mean()))
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    assert metrics["probe/f1"] == pytest.approx(float(2 * tp / (2 * tp + fp + fn)))
    for k in range(4):
        assert metrics[f"probe/accuracy/class_{k}"] == pytest.approx(float((pred[:, k] == truth[:, k]).float().mean()))
    assert math.isfinite(metrics["gradient/stability"])


def test_a_two_epoch_monitor_fit_on_a_multi_label_model_infers_the_task_and_reports_f1(tmp_path):
    import json

    import pytorch_lightning as pl

    from lightning_saliency import ProbeSet, SaliencyMonitor

    net = _Net("multilabel")
    probe = ProbeSet(net.x[:6], net.y[:6])
    # (not Grad-CAM: this 4-channel net's head has a label whose weights are all negative, a legitimately zero
    # Grad-CAM map that the health record flags)
    monitor = SaliencyMonitor(probe, methods=("gradient", "input_x_gradient"),
                              metrics=("stability", "drift", "deletion_auc"), expensive_every_n_audits=1,
                              dirpath=str(tmp_path / "saliency"), log_images=2)
    trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(net)
    report = json.loads((tmp_path / "saliency" / "report.json").read_text())
    assert report["config"]["task"] == "multilabel" and report["config"]["task_inferred"] is True
    assert [a["epoch"] for a in report["audits"]] == [0, 1]
    for audit in report["audits"]:
        assert audit["errors"] == []
        assert audit["health"]["gradient"] == "ok"
        for key in ("probe/accuracy", "probe/f1", "gradient/stability", "input_x_gradient/deletion_auc"):
            assert audit["metrics"][key] is not None and math.isfinite(audit["metrics"][key]), key


# ------------------------------------------------------------------------------------------------ segmentation


def _label_maps(n: int = 3) -> torch.Tensor:
    maps = torch.zeros(n, 8, 8, dtype=torch.long)
    maps[0, :4] = 1
    maps[1, :, :2] = 2
    maps[1, 7, 7] = 255  # no class
    maps[2:, 2:6, 2:6] = 1
    return maps


def test_a_label_map_probe_has_one_row_per_class_present_and_reports_mean_iou():
    from lightning_saliency.audit import AuditSpec, audit_shard, summarize
    from lightning_saliency.probe import ProbeSet

    model, x, maps = Seg(), _x(3), _label_maps()
    probe = ProbeSet(x, maps, groups=["a", "b", "b"])
    assert probe.targets.tolist() == [0, 1, 0, 2, 0, 1] and probe.groups == ["a", "a", "b", "b", "b", "b"]
    assert torch.equal(probe.labels[3], maps[1]) and torch.equal(probe.inputs[3], x[1])
    spec = AuditSpec(methods=("gradcam", "gradient"), metrics=("stability",), layer="body.1", target="label")
    result = audit_shard(model, probe, spec, on_error="raise")
    metrics = summarize(result, probe, spec)
    assert result.errors == []
    pred = model(x)["out"].detach().argmax(1)
    valid = maps != 255
    ious = []
    for c in range(3):  # dataset IoU per class, every image once
        inter = ((pred == c) & (maps == c) & valid).sum()
        union = (((pred == c) | (maps == c)) & valid).sum()
        if union:
            ious.append(float(inter / union))
            assert metrics[f"probe/accuracy/class_{c}"] == pytest.approx(ious[-1])
    assert metrics["probe/accuracy"] == pytest.approx(sum(ious) / len(ious))
    assert math.isfinite(metrics["gradient/stability"])


class _SegNet(__import__("pytorch_lightning").LightningModule):
    """A 16-px segmenter returning ``{"out": [N, 2, H, W]}`` (torchvision's form): class 1 is a bright square."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(16, 3, 16, 16, generator=g) * 0.3
        self.y = torch.zeros(16, 16, 16, dtype=torch.long)
        for i in range(16):
            r, c = int(torch.randint(0, 8, (1,), generator=g)), int(torch.randint(0, 8, (1,), generator=g))
            self.y[i, r:r + 8, c:c + 8] = 1
        self.x[:, 0] += self.y.float()

    def forward(self, x):
        return {"out": self.head(self.body(x)), "aux": None}

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x)["out"], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=8)


def test_a_two_epoch_monitor_fit_on_a_segmentation_model_infers_the_task_and_reports_mean_iou(tmp_path):
    import json

    import pytorch_lightning as pl

    from lightning_saliency import ProbeSet, SaliencyMonitor

    net = _SegNet()
    probe = ProbeSet(net.x[:4], net.y[:4])
    assert len(probe) == 8  # background and square in each image
    monitor = SaliencyMonitor(probe, methods=("gradcam", "gradient"), layer="body.1", target="label",
                              metrics=("stability", "drift", "deletion_auc"), expensive_every_n_audits=1,
                              dirpath=str(tmp_path / "saliency"), log_images=2)
    trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(net)
    report = json.loads((tmp_path / "saliency" / "report.json").read_text())
    assert report["config"]["task"] == "segmentation" and report["config"]["task_inferred"] is True
    assert [a["epoch"] for a in report["audits"]] == [0, 1]
    for audit in report["audits"]:
        assert audit["errors"] == []
        m = audit["metrics"]
        assert 0 <= m["probe/accuracy"] <= 1 and m["probe/accuracy"] == pytest.approx(
            (m["probe/accuracy/class_0"] + m["probe/accuracy/class_1"]) / 2)
        for key in ("gradient/stability", "gradient/deletion_auc", "gradcam/stability"):
            assert m[key] is not None and math.isfinite(m[key]), key
    # the page renders the run, its task in the config, and the overlays of each method
    from lightning_saliency.cli import main

    out = tmp_path / "audit.html"
    assert main(["report", str(tmp_path / "saliency"), "-o", str(out)]) == 0
    html = out.read_text()
    assert "segmentation" in html and "gradcam" in html and "<img" in html


class _Body8(nn.Module):
    """An 8-channel conv body with a head per task: multiclass / multilabel ``[N, 4]``, binary ``[N]``,
    segmentation ``{"out": [N, 3, H, W]}``."""

    def __init__(self, task: str):
        super().__init__()
        torch.manual_seed(3)
        self.task = task
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.seg = nn.Conv2d(8, 3, 1)
        self.fc = nn.Linear(8, 1 if task == "binary" else 4)

    def forward(self, x):
        h = self.body(x)
        if self.task == "segmentation":
            return {"out": self.seg(h)}
        y = self.fc(h.mean((2, 3)))
        return y[:, 0] if self.task == "binary" else y


@pytest.mark.parametrize("task,targets", [("multiclass", [0, 1, 2, 3, 0, 1]), ("binary", [0, 1, 0, 1, 0, 1]),
                                          ("multilabel", [3, 2, 1, 0, 1, 2]), ("segmentation", None)])
def test_every_method_gives_finite_maps_of_the_right_shape_non_constant_for_most_images_per_task(task, targets):
    model = _Body8(task)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    methods = [m for m in builtin_names() if not (task == "segmentation" and m == "cam")]
    t = None if targets is None else torch.tensor(targets)
    maps, info = attribute(model, x, t, methods=methods, layer="body.3", task=task if task == "multilabel" else None,
                           return_info=True, **FAST)
    assert info.task == task and list(maps) == methods and not info.errors
    for m, v in maps.items():
        assert tuple(v.shape) == (6, 16, 16) and bool(torch.isfinite(v).all()), m
        spread = v.flatten(1).amax(1) - v.flatten(1).amin(1)
        assert int((spread > 0).sum()) >= 4, (m, spread)


def test_an_alarm_on_probe_f1_is_accepted_on_a_multi_label_probe_only():
    from lightning_saliency.checks import check_alarm, key_problem
    from lightning_saliency.probe import ProbeSet

    multi = ProbeSet(_x(2), torch.tensor([[1, 1, 0], [0, 1, 1]]))
    single = ProbeSet(_x(2), torch.tensor([0, 1]))
    check_alarm("probe/f1", ("gradient",), ("stability",), multi)
    assert key_problem("probe/f1", ("gradient",), ("stability",), None) is None  # probe drawn later
    with pytest.raises(ValueError, match="multi-label probes only"):
        check_alarm("probe/f1", ("gradient",), ("stability",), single)


def test_probes_drawn_from_data_take_multi_hot_labels_and_label_maps():
    from lightning_saliency.probe import ProbeSet

    x = _x(4)
    multi = torch.tensor([[1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 0]])
    maps = torch.zeros(4, 8, 8, dtype=torch.long)
    maps[:, :3] = 2
    items = [{"image": x[i], "labels": multi[i].float()} for i in range(4)]
    probe = ProbeSet.from_dataset(items, size=4, seed=0)
    assert len(probe) == int(multi.sum()) and probe.labels.dtype == torch.bool and probe.labels.shape[1] == 3
    seg_items = [(x[i], maps[i]) for i in range(4)]
    loader = torch.utils.data.DataLoader(seg_items, batch_size=2)
    seg = ProbeSet.from_dataloader(loader, size=4)
    assert len(seg) == 8 and seg.targets.tolist() == [0, 2] * 4 and seg.labels.shape == (8, 8, 8)
    with pytest.raises(ValueError, match="all class indices, all multi-hot"):
        ProbeSet.from_dataset([{"image": x[0], "label": 1}, {"image": x[1], "label": multi[0]}], size=2)


def test_a_monitor_without_a_probe_draws_a_segmentation_probe_from_the_validation_data(tmp_path):
    import json

    import pytorch_lightning as pl

    from lightning_saliency import SaliencyMonitor

    class WithVal(_SegNet):
        def validation_step(self, batch, _):
            return self.training_step(batch, 0)

        def val_dataloader(self):
            return self.train_dataloader()

    monitor = SaliencyMonitor(None, probe_size=4, methods=("gradient",), metrics=("drift",),
                              dirpath=str(tmp_path / "saliency"), log_images=0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(WithVal())
    report = json.loads((tmp_path / "saliency" / "report.json").read_text())
    assert report["config"]["task"] == "segmentation" and monitor.probe.labels.shape[1:] == (16, 16)
    assert report["audits"][-1]["errors"] == [] and 0 <= report["audits"][-1]["metrics"]["probe/accuracy"] <= 1


def test_segmentation_over_given_target_masks_scores_the_class_logits_inside_each_mask():
    from lightning_saliency.tasks import Segmentation

    model, x = Seg(), _x(3)
    logits = model(x)["out"].detach()
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :2], masks[1, :, 3:], masks[2, 4, 4] = True, True, True
    t = torch.tensor([0, 2, 1])
    maps, info = attribute(model, x, t, methods=("gradient", "integrated_gradients", "occlusion"), layer="body.1",
                           task=Segmentation(masks), return_info=True, **FAST)
    assert info.task == "segmentation"
    expected = torch.stack([logits[i, c][masks[i]].sum() for i, c in enumerate(t.tolist())])
    torch.testing.assert_close(info.scores, expected)
    # the masks follow the images through the batched passes: one image at a time gives the same maps
    for i in range(3):
        one = attribute(model, x[i : i + 1], t[i : i + 1], methods=("gradient", "integrated_gradients", "occlusion"),
                        layer="body.1", task=Segmentation(masks[i : i + 1]), batch_size=3, **FAST)
        for m in maps:
            torch.testing.assert_close(maps[m][i : i + 1], one[m], msg=m)
    # a mask of the predicted pixels is the default score
    pred = logits.argmax(1)
    own = attribute(model, x, t, methods="gradient", task=Segmentation(pred == t.view(-1, 1, 1)))["gradient"]
    torch.testing.assert_close(own, attribute(model, x, t, methods="gradient")["gradient"])
    with pytest.raises(ValueError, match=r"Segmentation\(masks\).*\[N, 8, 8\]"):
        attribute(model, x, t, methods="gradient", task=Segmentation(torch.ones(3, 4, 4)))
    from lightning_saliency.audit import AuditSpec

    with pytest.raises(ValueError, match="task='segmentation'"):  # an audit explains its probe in parts
        AuditSpec(methods=("gradient",), task=Segmentation(masks))
