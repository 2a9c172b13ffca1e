"""Fine-tuning vs frozen features on Fashion-MNIST, on this CPU, within a stated time budget.

One run, side by side, on the same images:
  (a) logreg / svm heads on frozen features of the bundled EfficientNet-Lite0 (ImageNet weights)
      at the fine-tuning input size (with --native also at the model's own 224 px, for
      reference: slow on a busy 2-core CPU, so outside the default time budget);
  (b) the fine-tuned model's own classifier (`embedpipe finetune`);
  (c) logreg / svm heads on features re-extracted with the tuned weights (`extract --weights`).

Data: N train + M val images per class from Fashion-MNIST's train split (disjoint, seed 0) and
T test images per class from its test split, as PNG split folders under cache/bench-finetune/.
Heads are fitted on the train split only (`heads.build(name)` defaults, no search); the
fine-tune trains on the train split and uses val for early stopping / the best epoch. Every
number is test accuracy on the same T*10 test images.

    python bench/finetune.py                # 200/class train, 20/class val, 100/class test, 96 px
    python bench/finetune.py --quick        # tiny smoke test; writes a scratch file instead

Writes bench/results/finetune-fmnist.md (with --quick: a scratch file in the temp dir). The
natural-set study of the defaults is bench/finetune_natural.py (bench/results/finetune.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tf_efficientnet_lite0"
HEADS = ("logreg", "svm")


def make_data(root: Path, train: int, val: int, test: int) -> Path:
    from embedpipe.datasets import write_fashion_mnist_folder

    if not (root / "train").is_dir():
        write_fashion_mnist_folder(root, split="train", splits={"train": train, "val": val})
    if not (root / "test").is_dir():
        write_fashion_mnist_folder(root, split="test", splits={"test": test})
    return root


def extract(data: Path, out: Path, img_size: int | None, weights: str | None, workers: int):
    from embedpipe.extract.options import ExtractOptions
    from embedpipe.extract.local import run

    t0 = time.perf_counter()
    summary = run(data, out, ExtractOptions(model=MODEL, weights=weights, img_size=img_size,
                                            precision="fp32", workers=workers), progress=True)
    print(summary.line(), file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def split_arrays(store_path: Path):
    from embedpipe.store import open_store

    s = open_store(store_path)
    splits = np.asarray(s.splits)
    out = {}
    for name in ("train", "val", "test"):
        rows = np.flatnonzero(splits == name)
        out[name] = (s.features[rows], np.asarray([s.classes[i] for i in s.labels[rows]]))
    return out, s


def head_scores(arrays) -> dict[str, tuple[float, float]]:
    from embedpipe import heads

    (Xtr, ytr), (Xte, yte) = arrays["train"], arrays["test"]
    out = {}
    for name in HEADS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            est = heads.build(name).fit(Xtr, ytr)
            acc = float((est.predict(Xte) == yte).mean())
        out[name] = (acc, time.perf_counter() - t0)
        print(f"  {name}: {acc:.3f}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=200, help="train images per class")
    ap.add_argument("--val", type=int, default=20, help="val images per class")
    ap.add_argument("--test", type=int, default=100, help="test images per class")
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--head-epochs", type=int, default=2)
    ap.add_argument("--unfreeze", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for everything (1: see bench/results/precision.md)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--budget", type=float, default=600.0, help="stated time budget, seconds")
    ap.add_argument("--native", action="store_true",
                    help="also frozen features at the native 224 px (reference; slow)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke test")
    args = ap.parse_args()
    if args.quick:
        args.train, args.val, args.test, args.epochs, args.head_epochs = 6, 2, 5, 2, 1
        args.img_size, args.native = 64, False

    import torch

    from embedpipe.finetune import FinetuneOptions, finetune

    torch.set_num_threads(args.threads)
    hdr = bu.Header("Fine-tuning vs frozen features: Fashion-MNIST test accuracy on this CPU")
    meter = bu.CpuMeter()
    t_start = time.perf_counter()
    base = (Path(tempfile.gettempdir()) / "bench-finetune-quick" if args.quick
            else ROOT / "cache" / "bench-finetune")
    tag = f"fmnist-{args.train}-{args.val}-{args.test}"
    data = make_data(base / tag, args.train, args.val, args.test)
    size = args.img_size
    times: dict[str, float] = {}
    for old in base.glob(f"{tag}__*.h5"):  # extract afresh: the time is the whole cost
        old.unlink()

    print(f"(a) frozen base features at {size}px", file=sys.stderr, flush=True)
    times["extract base"] = extract(data, base / f"{tag}__base__{size}.h5", size, None,
                                    args.workers)
    base_arrays, base_store = split_arrays(base / f"{tag}__base__{size}.h5")
    results = [(f"(a) frozen base features, {size} px", name, acc, fit_s)
               for name, (acc, fit_s) in head_scores(base_arrays).items()]
    if args.native:
        print("(a') frozen base features at the native 224 px", file=sys.stderr, flush=True)
        times["extract base 224 px"] = extract(data, base / f"{tag}__base__224.h5", None, None,
                                               args.workers)
        native, _ = split_arrays(base / f"{tag}__base__224.h5")
        results += [("(a') frozen base features, native 224 px (reference)", name, acc, fit_s)
                    for name, (acc, fit_s) in head_scores(native).items()]

    print("(b) fine-tuning", file=sys.stderr, flush=True)
    out = base / f"{tag}__tuned{size}.pt"
    opts = FinetuneOptions(model=MODEL, epochs=args.epochs, head_epochs=args.head_epochs,
                           unfreeze=args.unfreeze, img_size=size, batch_size=args.batch_size,
                           workers=args.workers, threads=args.threads, keep_checkpoints=1)
    t0 = time.perf_counter()
    result = finetune(data, out, opts, overwrite=True, progress=True)
    times["fine-tune"] = time.perf_counter() - t0
    print(result.line(), file=sys.stderr, flush=True)

    print("(c) re-extraction with the tuned weights", file=sys.stderr, flush=True)
    tuned_h5 = base / f"{tag}__tuned__{size}.h5"
    if tuned_h5.exists():
        tuned_h5.unlink()  # the tuned weights are new each run: never reuse an old store
    times["extract tuned"] = extract(data, tuned_h5, size, str(out), args.workers)
    tuned_arrays, tuned_store = split_arrays(tuned_h5)
    assert tuned_store.meta["weights_sha256"] == result.sha256

    # (b): the fine-tuned model's own classifier applied to its pooled features of the test
    # images (exactly its eval forward pass: pool -> (no dropout in eval) -> linear)
    clf = torch.load(result.classifier, weights_only=True)
    Xte, yte = tuned_arrays["test"]
    logits = torch.from_numpy(Xte).float() @ clf["weight"].T + clf["bias"]
    own = np.asarray(result.classes)[logits.argmax(1).numpy()]
    own_acc = float((own == yte).mean())
    results.append(("(b) fine-tuned model's own classifier", "softmax (trained end to end)",
                    own_acc, times["fine-tune"]))
    results += [("(c) re-extracted with the tuned weights", name, acc, fit_s)
                for name, (acc, fit_s) in head_scores(tuned_arrays).items()]
    total = time.perf_counter() - t_start
    foreign = meter.foreign_cores()

    frozen = {h: a for label, h, a, _ in results if label.startswith("(a) ")}
    tuned = {h: a for label, h, a, _ in results if label.startswith("(c) ")}
    best_frozen = max(frozen.values())
    n_test = len(yte)
    se = 100 * np.sqrt(best_frozen * (1 - best_frozen) / n_test)

    def pts(x: float, y: float) -> str:
        return f"{100 * (x - y):+.1f} points"

    verdict = "; ".join(
        [f"(b) own classifier vs best frozen head: {own_acc:.3f} vs {best_frozen:.3f} "
         f"({pts(own_acc, best_frozen)})"]
        + [f"(c) {h} on tuned vs frozen features: {tuned[h]:.3f} vs {frozen[h]:.3f} "
           f"({pts(tuned[h], frozen[h])})" for h in HEADS])
    verdict += (f"; one accuracy on {n_test} test images has a binomial standard error of about "
                f"{se:.1f} points, and this is one seed")
    table = bu.table(["features", "head", "test accuracy", "fit s ((b): the whole fine-tune)"],
                     [(f, h, f"{a:.3f}", f"{s:.1f}") for f, h, a, s in results])
    hist = bu.table(
        ["epoch", "stage", "unfrozen", "train loss", "train acc (aug.)", "val loss", "val acc",
         "lr head", "lr backbone", "s"],
        [(r["epoch"], r["stage"], r["unfrozen_stages"], f"{r['train_loss']:.3f}",
          f"{r['train_accuracy']:.3f}", f"{r['val_loss']:.3f}", f"{r['val_accuracy']:.3f}",
          f"{r['lr_head']:.1e}", f"{r['lr_backbone']:.1e}" if r["lr_backbone"] else "frozen",
          f"{r['seconds']:.0f}") for r in result.history])
    timing = bu.table(["step", "wall s"], [(k, f"{v:.0f}") for k, v in times.items()]
                      + [("whole script", f"{total:.0f}")])
    n_tr, n_va, n_te = (len(base_arrays[s][1]) for s in ("train", "val", "test"))
    budget = ("within" if total <= args.budget else "OVER") + f" the stated budget of {args.budget:.0f} s"
    extra = [
        f"data: Fashion-MNIST, {n_tr} train ({args.train}/class) + {n_va} val ({args.val}/class) "
        f"images from its train split, {n_te} test images ({args.test}/class) from its test split "
        "(seed 0), 28x28 grayscale PNGs upscaled by the model's transform",
        f"model: {MODEL}, bundled ImageNet weights ({base_store.meta['weights_source']}); "
        f"fine-tune and features at {size} px; fp32 everywhere; torch threads {args.threads}, "
        f"loader workers {args.workers}",
        "fine-tune: `embedpipe.finetune.finetune` with "
        + ", ".join(f"{k}={v}" for k, v in json.loads(result.manifest.read_text())["options"].items()
                    if k in ("epochs", "head_epochs", "unfreeze", "gradual", "batch_size", "lr",
                             "head_lr", "weight_decay", "warmup_epochs", "label_smoothing",
                             "dropout", "randaugment", "cutmix", "patience", "seed"))
        + f"; best epoch {result.best_epoch} of {result.epochs_run} (val accuracy "
        f"{result.best_val_accuracy:.3f}); the tuned weights are those of the best epoch",
        "heads: `embedpipe.heads.build(name)` defaults (no search) fitted on the train split only; "
        "(b) applies the tuned model's own classifier to its pooled test features",
        f"time: {total:.0f} s for the whole run, {budget}; other processes kept "
        f"{foreign:.2f} of {bu.cores()} cores busy on average",
        f"**{verdict}**",
    ]
    if args.quick:
        extra.append("QUICK smoke-test run: tiny sets; numbers mean little")
    text = (hdr.render(extra) + "\n## Test accuracy\n\n" + table
            + "\n\n## Fine-tuning history\n\n" + hist
            + "\n\n## Time\n\n" + timing + "\n")
    print(text)
    if args.quick:
        dest = Path(tempfile.gettempdir()) / "finetune.quick.md"
        dest.write_text(text)
    else:
        dest = bu.write_result("finetune-fmnist", text)
    print(f"wrote {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
