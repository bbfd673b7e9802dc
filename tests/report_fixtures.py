"""Test fixtures for the gate, CLI and page tests: realistic report.json files written directly, no training.

``make_run(root)`` writes ``<root>/saliency/report.json`` (schema lightning-saliency/report/v1) with several audits
of two methods (gradcam, gradient), per-group keys, an alarm firing, an audit error and a null metric, plus the
maps on disk (``maps/probe.npz`` thumbnails and ``maps/epoch_XXXX.npz`` float16 maps) per /tmp/interfaces.md.

Example:
    >>> import tempfile
    >>> log_dir = make_run(tempfile.mkdtemp())
    >>> (log_dir / "saliency" / "report.json").is_file()
    True
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCHEMA = "lightning-saliency/report/v1"
METHODS = ("gradcam", "gradient")
GROUPS = ("hospital_a", "hospital_b")


def probe_images(n: int = 12, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Thumbnails uint8 [n,size,size,3]: a coloured square or disc on a dark background; even images get a
    bright border (the shortcut). Returns images, targets, groups."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((n, size, size, 3), np.uint8)
    targets = np.zeros(n, np.int64)
    groups = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 40 + 20).astype(np.uint8)
        cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
        r = size // 6
        cls = i % 2
        shape = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r) if cls == 0 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[shape] = (220, 80, 60) if cls == 0 else (60, 140, 230)
        if i % 4 < 2:
            img[:2], img[-2:], img[:, :2], img[:, -2:] = 255, 255, 255, 255
        images[i] = img
        targets[i] = cls
        groups.append(GROUPS[i % 2])
    return images, targets, groups


def _maps(n: int, size: int, epoch: int, n_epochs: int, seed: int, speckle: bool = False) -> np.ndarray:
    """Maps [n,size,size] in [0,1] that drift from the object (centre) to the border as epochs go by;
    ``speckle`` multiplies them by pixel noise, the look of gradient maps."""
    rng = np.random.default_rng(seed + epoch)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = epoch / max(n_epochs - 1, 1)
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        cy, cx = 0.5 + rng.normal(0, 0.08, size=2)
        centre = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        border = np.maximum(np.abs(yy - 0.5), np.abs(xx - 0.5)) * 2
        m = (1 - t) * centre + t * border**6
        if speckle:
            m = m * rng.random((size, size)) ** 2
        out[i] = (m - m.min()) / max(m.max() - m.min(), 1e-9)
    return out


def make_report_data(n_epochs: int = 6, log_dir: str = "lightning_logs/version_0", with_maps: bool = True) -> dict:
    """A report dict per the v1 schema: audits at epochs 0..n_epochs-1, an alarm firing at the last epoch
    whose spurious mass crosses 0.35, an audit error on epoch 2 (gradient failed there, its metrics null)."""
    audits = []
    alarms = []
    for e in range(n_epochs):
        t = e / max(n_epochs - 1, 1)
        metrics: dict[str, float | None] = {}
        for k, method in enumerate(METHODS):
            spurious = round(0.1 + 0.4 * t + 0.02 * k, 4)
            metrics[f"{method}/spurious_mass"] = spurious
            metrics[f"{method}/object_mass"] = round(0.7 - 0.5 * t - 0.1 * k, 4)
            metrics[f"{method}/pointing_game"] = round(0.9 - 0.6 * t - 0.15 * k, 4)
            metrics[f"{method}/stability"] = round(0.95 - 0.1 * t - 0.2 * k, 4)
            metrics[f"{method}/attention_disparity"] = round(0.05 + 0.2 * t + 0.03 * k, 4)
            for g, group in enumerate(GROUPS):
                metrics[f"{method}/spurious_mass/{group}"] = round(spurious + (0.05 if g else -0.05) * t, 4)
        errors = []
        if e == 2:
            errors.append({"method": "gradient", "type": "RuntimeError", "message": "CUDA out of memory (simulated)"})
            for key in list(metrics):
                if key.startswith("gradient/"):
                    metrics[key] = None
        audits.append(
            {
                "epoch": e,
                "global_step": 50 * (e + 1),
                "time": f"2024-05-01T12:{e:02d}:00+00:00",
                "duration_s": 1.25 + 0.01 * e,
                "precision": "float32",
                "metrics": metrics,
                "errors": errors,
                "maps": f"maps/epoch_{e:04d}.npz" if with_maps else None,
            }
        )
        if metrics["gradcam/spurious_mass"] is not None and metrics["gradcam/spurious_mass"] > 0.35:
            alarms.append(
                {
                    "name": "ShortcutAlarm",
                    "metric": "gradcam/spurious_mass",
                    "threshold": 0.35,
                    "mode": "max",
                    "epoch": e,
                    "global_step": 50 * (e + 1),
                    "value": metrics["gradcam/spurious_mass"],
                    "action": "stop",
                }
            )
    return {
        "schema": SCHEMA,
        "created": "2024-05-01T12:00:00+00:00",
        "updated": f"2024-05-01T12:{n_epochs:02d}:00+00:00",
        "run": {
            "log_dir": log_dir,
            "model": "TinyConvNet",
            "torch": "2.4.0",
            "lightning": "2.4.0",
            "precision": "32-true",
            "world_size": 1,
        },
        "probe": {
            "size": 12,
            "fingerprint": "ab" * 32,
            "groups": {GROUPS[0]: 6, GROUPS[1]: 6},
            "object_masks": True,
            "spurious_masks": True,
        },
        "config": {
            "methods": list(METHODS),
            "layer": "features.3",
            "metrics": ["region_mass", "pointing_game", "stability", "attention_disparity"],
            "every_n_epochs": 1,
        },
        "audits": audits,
        "alarms": alarms,
    }


def write_maps(saliency_dir: Path, epochs: list[int], n: int = 12, size: int = 32, n_epochs: int | None = None) -> None:
    """Write maps/probe.npz and maps/epoch_XXXX.npz (one float16 array per method, plus predictions)."""
    maps_dir = saliency_dir / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    images, targets, groups = probe_images(n, size)
    np.savez(maps_dir / "probe.npz", images=images, targets=targets, groups=np.array(groups))
    total = n_epochs or (max(epochs) + 1 if epochs else 1)
    for e in epochs:
        arrays = {m: _maps(n, size, e, total, seed=17 * k, speckle=m == "gradient").astype(np.float16)
                  for k, m in enumerate(METHODS)}
        preds = targets.copy()
        preds[: e % n] = 1 - preds[: e % n]
        np.savez(maps_dir / f"epoch_{e:04d}.npz", predictions=preds, **arrays)


def write_report(saliency_dir: Path, data: dict | str | bytes) -> Path:
    """Write ``data`` (a dict, or raw text/bytes for malformed cases) to saliency_dir/report.json."""
    saliency_dir.mkdir(parents=True, exist_ok=True)
    path = saliency_dir / "report.json"
    if isinstance(data, dict):
        path.write_text(json.dumps(data, indent=1))
    elif isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def make_run(root: str | Path, n_epochs: int = 6, with_maps: bool = True, n: int = 12, size: int = 32) -> Path:
    """A log dir with saliency/report.json and its maps; returns the log dir."""
    log_dir = Path(root) / "lightning_logs" / "version_0"
    saliency_dir = log_dir / "saliency"
    data = make_report_data(n_epochs, str(log_dir), with_maps=with_maps)
    write_report(saliency_dir, data)
    if with_maps:
        write_maps(saliency_dir, list(range(n_epochs)), n=n, size=size, n_epochs=n_epochs)
    return log_dir
