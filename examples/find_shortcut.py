"""Find a shortcut nobody annotated: the monitor's discovery (SpRAy on the maps, then confirmation by pasting).

The data are the shortcut example's shapes (``examples/shortcut_shapes.py``: square, disk, cross) near the
centre of noisy backgrounds, without its corner patch. A small bright watermark is planted in ``--p`` percent of
ONE class's images (``square``), in the training set and in the probe alike, and nobody tells the audit where it
is: the probe has no masks. In ``--control`` mode the same watermark lands on ``--p`` percent of the images of
every class, so it predicts nothing.

The model trains under ``SaliencyMonitor(probe)`` (its defaults: Grad-CAM and gradient maps, discovery on,
an audit every epoch), with validation on clean images (no watermark anywhere). After the fit the script reads
the monitor's ``report.json`` back: per audit, the candidates that discovery found and the confirmation's
verdict; the best confirmed candidate's members are scored against the planted truth (precision, recall), next
to its flip rate, its random-region null and the clean validation accuracy of that epoch.

Run it (about 10 seconds per run on 2 CPU cores)::

    python examples/find_shortcut.py --p 50 --seed 0            # one run, epoch by epoch
    python examples/find_shortcut.py --p 50 --control --seed 0  # the control
    python examples/find_shortcut.py --sweep                    # the README's table (14 runs)

``--sweep`` runs ``--p`` 10, 25 and 50 with ``--seed`` 0, 1, 2 and the control (``--p 50``) with ``--seed`` 0 to
4, each with the defaults otherwise (4 epochs, 1200 training images, a probe of 32 images per class), and prints
the Markdown table of the README. Each run's files go under ``--log-dir`` (default ``runs/find_shortcut``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.shortcut_shapes import CLASSES, ShapesNet, _shape_mask  # noqa: E402

MARK = (slice(2, 6), slice(26, 30))  # rows, cols of the watermark (a 4x4 square near the top-right corner)
MARK_VALUE = 2.5  # its brightness, every channel
SHORTCUT_CLASS = 0  # "square"


def shapes(n: int, seed: int, size: int = 32, noise: float = 0.4, jitter: float = 4.0) -> tuple[Tensor, Tensor]:
    """``n`` images of one shape each (the shortcut example's shapes and colours) near the centre (up to
    ``jitter`` pixels off), on Gaussian noise; returns ``(inputs [n, 3, size, size], labels [n])``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    x = noise * torch.randn(n, 3, size, size, generator=g)
    for i in range(n):
        r = 3.0 + 3.0 * torch.rand((), generator=g).item()
        cy, cx = (size / 2 + jitter * (2 * torch.rand(2, generator=g) - 1)).tolist()
        mask = _shape_mask(int(labels[i]), size, cy, cx, r)
        color = 0.6 + 0.8 * torch.rand(3, generator=g)
        x[i] = torch.where(mask, x[i] + color[:, None, None], x[i])
    return x, labels


def planted(n: int, p: float, control: bool, seed: int, per_class: int | None = None,
            noise: float = 0.4) -> dict[str, Tensor]:
    """Shapes with the watermark on a share ``p`` of the ``square`` images (``control``: of every class).

    ``per_class`` draws exactly that many images of each class (the probe) and marks exactly
    ``round(p · per_class)`` of each marked class; otherwise each image is marked with probability ``p``.
    Returns ``{"inputs", "labels", "marked"}``.

    Example:
        >>> d = planted(30, 0.5, False, 0, per_class=10)
        >>> int(d["marked"].sum()), bool((d["labels"][d["marked"]] == 0).all())
        (5, True)
    """
    total = n if per_class is None else 3 * per_class * 4  # enough draws to fill each class
    x, y = shapes(total, seed, noise=noise)
    g = torch.Generator().manual_seed(seed + 7919)
    if per_class is not None:
        keep = torch.cat([(y == k).nonzero()[:per_class, 0] for k in range(len(CLASSES))])
        x, y = x[keep], y[keep]
        marked = torch.zeros(len(y), dtype=torch.bool)
        for k in range(len(CLASSES)):
            if control or k == SHORTCUT_CLASS:
                idx = (y == k).nonzero()[:, 0]
                chosen = idx[torch.randperm(len(idx), generator=g)[: round(p * len(idx))]]
                marked[chosen] = True
    else:
        marked = torch.rand(len(y), generator=g) < p
        if not control:
            marked &= y == SHORTCUT_CLASS
    x[marked, :, MARK[0], MARK[1]] = MARK_VALUE
    return {"inputs": x, "labels": y, "marked": marked}


def _precision_recall(members: list[int], truth: set[int]) -> tuple[float, float]:
    hit = len(set(members) & truth)
    return (hit / len(members) if members else math.nan, hit / len(truth) if truth else math.nan)


class CleanAccuracy(pl.Callback):
    """The validation accuracy (clean images) of each training epoch, as the model logged it (``val_acc``)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.by_epoch[int(trainer.current_epoch)] = float(trainer.callback_metrics["val_acc"])


def read_report(report: dict[str, Any], truth: set[int], clean: dict[int, float]) -> list[dict[str, Any]]:
    """One row per fit audit of the monitor's report: the candidates, how many are confirmed, and the best
    confirmed one's precision and recall against ``truth`` (probe indices of the watermarked images), its flip
    rate and nulls, and the clean validation accuracy of that epoch (``clean``: epoch -> accuracy).

    Example:
        >>> audit = {"stage": "fit", "epoch": 0, "metrics": {"discovery/suspects": 1.0}, "discovery": {
        ...     "candidates": [{"class": 0, "members": [1, 2, 3, 4], "confirmed": True, "flip_rate": 0.9,
        ...                     "null_flip_rate": 0.1, "rest_flip_rate": 0.0}]}}
        >>> row = read_report({"audits": [audit]}, {1, 2, 3}, {0: 0.8})[0]
        >>> row["confirmed"], row["precision"], row["recall"], row["clean_val_acc"]
        (1, 0.75, 1.0, 0.8)
    """
    rows = []
    for audit in report["audits"]:
        if audit.get("stage", "fit") != "fit" or not isinstance(audit.get("discovery"), dict):
            continue
        cands = audit["discovery"].get("candidates") or []
        confirmed = [c for c in cands if c.get("confirmed")]
        best = max(confirmed, key=lambda c: c["flip_rate"]) if confirmed else None
        precision, recall = _precision_recall(best["members"], truth) if best else (math.nan, math.nan)
        rows.append({
            "epoch": audit["epoch"], "clean_val_acc": clean.get(audit["epoch"], math.nan),
            "suspects": audit["metrics"].get("discovery/suspects"), "confirmed": len(confirmed),
            "precision": precision, "recall": recall,
            **{k: best[k] if best else None for k in ("flip_rate", "null_flip_rate", "rest_flip_rate")},
            "candidates": cands,
        })
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=float, default=50.0, help="percent of the square images that carry the watermark")
    ap.add_argument("--control", action="store_true", help="the watermark lands on images of every class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=1200)
    ap.add_argument("--probe-per-class", type=int, default=32)
    ap.add_argument("--width", type=int, default=8, help="channels of the CNN's first block")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--noise", type=float, default=0.4, help="std of the background noise")
    ap.add_argument("--target", default="label", choices=("label", "prediction"),
                    help="the maps explain each probe image's label (default) or the model's prediction")
    ap.add_argument("--log-dir", default=os.path.join("runs", "find_shortcut"),
                    help="each run writes its saliency folder (report.json, maps) under here")
    ap.add_argument("--out", default=None, help="write the JSON summary (the sweep's: all runs) here")
    ap.add_argument("--sweep", action="store_true", help="run the README's grid and print its table")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train one model under the monitor and read its report back: the run's summary (module docstring)."""
    from lightning_saliency import ProbeSet, SaliencyMonitor

    started = time.perf_counter()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pl.seed_everything(args.seed, workers=True, verbose=False)
    p = args.p / 100.0
    train = planted(args.train_size, p, args.control, args.seed, noise=args.noise)
    probe = planted(0, p, args.control, args.seed + 1, per_class=args.probe_per_class, noise=args.noise)
    clean = planted(300, 0.0, False, args.seed + 2, noise=args.noise)

    def loader(data: dict[str, Tensor], shuffle: bool) -> torch.utils.data.DataLoader:
        items = [{"image": x, "label": int(t)} for x, t in zip(data["inputs"], data["labels"])]
        return torch.utils.data.DataLoader(items, batch_size=args.batch_size, shuffle=shuffle)

    name = f"p{args.p:g}_seed{args.seed}" + ("_control" if args.control else "")
    saliency = os.path.join(args.log_dir, name, "saliency")
    # no masks, no groups: the monitor is told nothing about the watermark
    monitor = SaliencyMonitor(ProbeSet(probe["inputs"], probe["labels"]), dirpath=saliency, seed=args.seed,
                              class_names=list(CLASSES), target=args.target)
    accuracy = CleanAccuracy()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         callbacks=[monitor, accuracy], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ShapesNet(lr=args.lr, width=args.width), loader(train, True), loader(clean, False))
    with open(os.path.join(saliency, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    truth = set(probe["marked"].nonzero()[:, 0].tolist()) if not args.control else set()
    rows = read_report(report, truth, accuracy.by_epoch)
    first = next((r for r in rows if r["confirmed"]), None)
    at_first = ("precision", "recall", "flip_rate", "null_flip_rate", "rest_flip_rate", "clean_val_acc")
    summary = {
        "p": args.p, "control": args.control, "seed": args.seed, "epochs": args.epochs,
        "method": report["audits"][-1]["discovery"]["method"], "report": os.path.join(saliency, "report.json"),
        "first_epoch_confirmed": None if first is None else first["epoch"],
        **{k: None if first is None else first[k] for k in at_first},  # of the best confirmed candidate then
        "final_clean_val_acc": rows[-1]["clean_val_acc"] if rows else None,
        "confirmed_per_epoch": [r["confirmed"] for r in rows], "seconds": round(time.perf_counter() - started, 1),
        "audits": rows,
    }
    if not args.quiet:
        for r in rows:
            print(f"epoch {r['epoch']}: clean val acc {r['clean_val_acc']:.3f}, {len(r['candidates'])} "
                  f"candidate(s), {r['confirmed']} confirmed")
            for c in r["candidates"]:
                pr, rc = _precision_recall(c["members"], truth)
                print(f"   class {CLASSES[c['class']]:<6} {len(c['members']):>2} members  region {c['region']}  "
                      f"score {c['score']:.2f}  flip {_num(c['flip_rate'])} (nulls: random region "
                      f"{_num(c['null_flip_rate'])}, rest of class {_num(c['rest_flip_rate'])})  erase drop "
                      f"{_num(c['erase_accuracy_drop'])}  precision {_num(pr)} recall {_num(rc)}  "
                      f"{'CONFIRMED' if c['confirmed'] else 'not confirmed'}")
        print(f"first epoch with a confirmed candidate: {summary['first_epoch_confirmed']}; precision "
              f"{_num(summary['precision'])}, recall {_num(summary['recall'])}, flip {_num(summary['flip_rate'])} "
              f"(null {_num(summary['null_flip_rate'])}), clean val acc {_num(summary['clean_val_acc'])}; "
              f"{summary['seconds']} s; report: {summary['report']}")
    return summary


def _num(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


GRID = [(p, False, seed) for p in (10.0, 25.0, 50.0) for seed in (0, 1, 2)] + [(50.0, True, s) for s in range(5)]


def table(summaries: list[dict[str, Any]]) -> str:
    """The README's Markdown table: one row per run of the sweep.

    Example:
        >>> print(table([{"p": 50.0, "control": False, "seed": 0, "first_epoch_confirmed": None,
        ...               "final_clean_val_acc": 0.9, "confirmed_per_epoch": [0, 0], "seconds": 9.0}]))
        ... # doctest: +NORMALIZE_WHITESPACE
        | data | seed | first audit confirmed | precision | recall | flip rate | null | rest null | clean val. accuracy then | at the last epoch | confirmed per audit | s |
        | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |
        | p = 50% | 0 | none | | | | | | | 0.90 | 0, 0 | 9 |
    """
    head = ("| data | seed | first audit confirmed | precision | recall | flip rate | null | rest null | "
            "clean val. accuracy then | at the last epoch | confirmed per audit | s |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    lines = [head]
    for s in summaries:
        data = f"control ({s['p']:g}% of every class)" if s["control"] else f"p = {s['p']:g}%"
        found = s["first_epoch_confirmed"] is not None
        cells = [_num(s.get(k)) if found else "" for k in ("precision", "recall", "flip_rate", "null_flip_rate",
                                                             "rest_flip_rate", "clean_val_acc")]
        if s["control"]:
            cells[:2] = ["", ""]  # nothing planted to match
        lines.append(f"| {data} | {s['seed']} | {s['first_epoch_confirmed'] if found else 'none'} | "
                     + " | ".join(cells) + f" | {_num(s['final_clean_val_acc'])} | "
                     f"{', '.join(str(c) for c in s['confirmed_per_epoch'])} | {s['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    args = parse_args(argv)
    if not args.sweep:
        summary = run(args)
        if args.out:
            _write(args.out, summary)
        return summary
    started, summaries = time.perf_counter(), []
    for p, control, seed in GRID:
        summaries.append(run(argparse.Namespace(**{**vars(args), "p": p, "control": control, "seed": seed,
                                                   "quiet": True})))
        s = summaries[-1]
        print(f"p={p:g}{' control' if control else ''} seed {seed}: first confirmed {s['first_epoch_confirmed']}, "
              f"confirmed per audit {s['confirmed_per_epoch']} ({s['seconds']} s)", flush=True)
    print()
    print(table(summaries))
    print(f"\n{len(summaries)} runs in {time.perf_counter() - started:.0f} s")
    if args.out:
        _write(args.out, summaries)
    return summaries


def _write(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, default=float)


if __name__ == "__main__":
    main(sys.argv[1:])
