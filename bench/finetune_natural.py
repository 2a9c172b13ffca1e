"""Does `finetune` with its defaults pay on a small natural-image set, on this CPU?

The set: bench/natural.py's 8 classes of cut-out photos (170 train / 71 test RGBA PNGs). Every
number is test accuracy on the same 71 test images (1 image = 1.4 points), and every choice is
the code's defaults, as a user gets them:

  (a) frozen: `extract` (defaults: the bundled EfficientNet-Lite0 at 224 px) then heads fitted
      on the 170 train rows: `--head auto` (the default head of `fit`) and logreg;
  (b) `finetune` with its defaults (seed S; the fine-tune validates on its own stratified 20%
      of train), then `extract --weights tuned.pt` (defaults again) and the same heads on the
      170 re-extracted train rows;
  (c) the tuned model's own classifier (its eval forward pass: pooled features -> linear) on
      the re-extracted test features.

Seeds: the fine-tune is run for each seed (the seed moves the validation split, the new
classifier's initialisation, augmentation and shuffling). The trade-off table follows seed 0's
run through `--budget`: it is started with the smallest budget, and each later point is
`--resume` of the same run with the rest of the next budget (a budget caps one call; the CPU
seconds add up), so every point is exactly what `finetune --budget B` would have written, and
the last point (no budget) is the uninterrupted run (resume is exact on the CPU). With
``--long N`` (default 40) the table also has seed 0 trained for N epochs instead of the default.

CPU seconds are user + system of this process and its loader workers (getrusage SELF +
CHILDREN), so another user's load changes the wall time, not them.

    python bench/finetune_natural.py                  # seeds 0 1 2, budgets 45 90 135 s
    python bench/finetune_natural.py --quick          # smoke test (2 epochs, 1 seed, scratch file)

Writes bench/results/finetune.md and finetune.json (with --quick: scratch files in the temp dir).
The older Fashion-MNIST comparison (bench/finetune.py) is in bench/results/finetune-fmnist.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "cache" / "bench-finetune-natural"


def cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def extract(data: Path, out: Path, weights: Path | None) -> tuple[float, object]:
    from embedpipe.extract.local import run
    from embedpipe.extract.options import ExtractOptions

    if out.exists():
        out.unlink()  # always afresh: the cost is part of the result
    c0 = cpu()
    summary = run(data, out, ExtractOptions(weights=str(weights) if weights else None),
                  progress=False)
    return cpu() - c0, summary


def scores(store_path: Path, classifier: Path | None = None) -> dict[str, float]:
    """Test accuracy of `--head auto` and logreg (fitted on the train rows), and of the tuned
    classifier when given."""
    import torch

    from embedpipe.heads import auto
    from embedpipe.heads.fit import fit_configuration
    from embedpipe.heads.rows import select_rows, targets
    from embedpipe.heads.source import Labeled
    from embedpipe.store import open_store

    s = open_store(store_path)
    r = select_rows(s)
    te = r.heldout["test"]
    Xtr, ytr, Xte, yte = s.features[r.train], targets(s, r.train), s.features[te], targets(s, te)
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est, _, sel = auto.fit_auto(Xtr, ytr)
        out["auto"] = float((np.asarray(est.predict(Xte)) == yte).mean())
        out["auto_choice"] = sel.choice["name"]
        est, _ = fit_configuration(Labeled.in_memory(Xtr, ytr), "logreg", None)
        out["logreg"] = float((np.asarray(est.predict(Xte)) == yte).mean())
    if classifier is not None:
        clf = torch.load(classifier, weights_only=True)
        classes = json.loads(classifier.with_name(
            classifier.name.replace(".classifier.pt", ".json")).read_text())["classes"]
        logits = torch.from_numpy(np.asarray(Xte, dtype=np.float32)) @ clf["weight"].T + clf["bias"]
        own = np.asarray(classes)[logits.argmax(1).numpy()]
        out["own"] = float((own == np.asarray(yte)).mean())
    out["n_test"] = int(len(yte))
    return out


def tuned_point(data: Path, out: Path, tag: str) -> dict:
    manifest = json.loads(out.with_suffix(".json").read_text())
    ex_cpu, _ = extract(data, WORK / f"{tag}.h5", out)
    sc = scores(WORK / f"{tag}.h5", out.with_name(out.stem + ".classifier.pt"))
    return {"tag": tag, **sc, "extract_cpu": ex_cpu, "best_epoch": manifest["best_epoch"],
            "epochs_run": manifest["epochs_run"], "best_val": manifest["best_val_accuracy"],
            "best_weights": manifest.get("best_weights"),
            "stopped_by_budget": manifest.get("stopped_by_budget"),
            "stopped_early": manifest["stopped_early"], "history": manifest_history(out)}


def manifest_history(out: Path) -> list[dict]:
    return json.loads(out.with_name(out.stem + ".history.json").read_text())["history"]


def run_seed(data: Path, base: dict, seed: int, chain: list[float],
             extra: dict) -> tuple[list[dict], list[dict]]:
    """One fine-tune (its own process: its CPU seconds are its own) of ``seed``: through the
    budgets of ``chain`` (each a --resume of the same run), then to the end; each stop
    re-extracted and scored."""
    import torch

    from embedpipe.finetune import FinetuneOptions, finetune

    torch.set_num_threads(1)
    # this process was spawned, so its children would be too; `extract`'s loader workers are
    # started as from the command line (fork: its transform holds a lambda spawn cannot pickle)
    multiprocessing.set_start_method("fork", force=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    opts = FinetuneOptions(**{**base, **extra, "seed": seed})
    name = f"tuned-s{seed}" + "".join(f"-{k}{v}" for k, v in extra.items())
    out = WORK / f"{name}.pt"
    for stale in WORK.glob(f"{name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    resume, used = None, 0.0
    runs: list[dict] = []
    points: list[dict] = []
    for b in [*chain, None]:
        if b is not None and b <= used:
            continue
        step = FinetuneOptions(**{**asdict(opts), "budget": None if b is None else b - used})
        w0 = time.perf_counter()
        res = finetune(data, out, step, resume=resume, overwrite=resume is None,
                       progress=False, say=lambda m: None)
        wall = time.perf_counter() - w0
        used += res.cpu_seconds
        resume = out.with_name(out.stem + ".checkpoints")
        log(f"(b) {name} budget {b}: {res.line()}")
        pt = {"seed": seed, "budget": b, "cpu": used, "wall": wall, "extra": extra,
              **tuned_point(data, out, f"{name}-{'end' if b is None else int(b)}")}
        log(f"  {name} budget {b}: auto {pt['auto']:.3f} logreg {pt['logreg']:.3f} "
            f"own {pt['own']:.3f}")
        (points if b is not None else runs).append(pt)
        if b is not None and not res.stopped_by_budget:
            points[-1]["finished"] = True
            runs.append(pt)
            break
    return runs, points


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="*", default=[45.0, 90.0, 135.0],
                    help="CPU seconds for the trade-off points (seed 0), ascending")
    ap.add_argument("--long", type=int, default=40,
                    help="also seed 0 with this many epochs (0: not)")
    ap.add_argument("--jobs", type=int, default=3,
                    help="fine-tunes run side by side in their own processes (one torch thread "
                         "each; CPU seconds are per process, so this changes only wall time)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, one seed")
    args = ap.parse_args()

    import natural
    import torch

    from embedpipe.finetune import FinetuneOptions

    hdr = bu.Header("Fine-tuning that pays? The natural set (170 train / 71 test), defaults only")
    meter = bu.CpuMeter()
    data = natural.build()
    WORK.mkdir(parents=True, exist_ok=True)
    # the recipe's defaults; threads and loader workers are machine settings (not part of the
    # recipe or of a checkpoint's fingerprint): one torch thread and no loader process, so
    # that CPU seconds measure the work, not OpenMP threads spinning on a shared machine
    base_opts = FinetuneOptions(threads=1, workers=0)
    if args.quick:
        args.seeds, args.budgets, args.long = args.seeds[:1], args.budgets[:1], 3
        base_opts = FinetuneOptions(epochs=2, head_epochs=1, threads=1, workers=0)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    log("(a) frozen features")
    fz_cpu, _ = extract(data, WORK / "frozen.h5", None)
    frozen = {**scores(WORK / "frozen.h5"), "extract_cpu": fz_cpu}
    log(f"  frozen: {frozen}")

    jobs = [(seed, args.budgets if seed == args.seeds[0] else [], {})
            for seed in args.seeds]
    if args.long:
        jobs.append((args.seeds[0], [], {"epochs": args.long}))
    runs: list[dict] = []
    points: list[dict] = []
    longer: list[dict] = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_seed, data, asdict(base_opts), seed, chain, extra)
                   for seed, chain, extra in jobs]
        for (seed, chain, extra), fut in zip(jobs, futures):
            r, pts_ = fut.result()
            (longer if extra else runs).extend(r)
            points.extend(pts_)
    foreign = meter.foreign_cores()

    n = frozen["n_test"]
    best_frozen = max(frozen["auto"], frozen["logreg"])

    def acc(x: float) -> str:
        return f"{x:.3f} ({round(x * n)}/{n})"

    rows = [("(a) frozen", "—", "—", acc(frozen["auto"]), acc(frozen["logreg"]), "—",
             f"{frozen['extract_cpu']:.0f}")]
    for r in runs:
        rows.append((f"(b)/(c) tuned, seed {r['seed']}", f"{r['cpu'] / 60:.1f}",
                     f"{r['best_epoch']}/{r['epochs_run']} ({r['best_weights']}, val "
                     f"{r['best_val']:.3f})", acc(r["auto"]), acc(r["logreg"]), acc(r["own"]),
                     f"{r['extract_cpu']:.0f}"))
    mean = {k: float(np.mean([r[k] for r in runs])) for k in ("auto", "logreg", "own")}
    rows.append(("(b)/(c) tuned, mean of seeds", f"{np.mean([r['cpu'] for r in runs]) / 60:.1f}",
                 "", f"{mean['auto']:.3f}", f"{mean['logreg']:.3f}", f"{mean['own']:.3f}", ""))
    main_table = bu.table(["features", "fine-tune CPU min", "kept epoch (weights, val acc)",
                           "--head auto", "logreg", "own classifier", "extract CPU s"], rows)
    trade = [("0 (frozen)", "—", acc(frozen["auto"]), acc(frozen["logreg"]), "—")]
    for p in [*points, *(r for r in runs if r["seed"] == args.seeds[0]
                         and not r.get("finished")), *longer]:
        label = (f"--budget {p['budget']:.0f}" if p["budget"] is not None else
                 f"--epochs {p['extra']['epochs']}" if p["extra"] else "no budget")
        trade.append((f"{p['cpu'] / 60:.1f} ({label}, epochs {p['epochs_run']}, best "
                      f"{p['best_epoch']})",
                      "stopped by budget" if p.get("stopped_by_budget") else "finished",
                      acc(p["auto"]), acc(p["logreg"]), acc(p["own"])))
    trade_table = bu.table(["fine-tune CPU minutes (seed 0; kept epoch)", "how it ended", "--head auto",
                            "logreg", "own classifier"], trade)
    hist = runs[0]["history"]
    hist_table = bu.table(
        ["epoch", "stage", "unfrozen", "train loss", "train acc (aug.)", "val acc",
         "val acc EMA", "kept", "lr head", "lr backbone", "CPU s"],
        [(h["epoch"], h["stage"], h["unfrozen_stages"], f"{h['train_loss']:.3f}",
          f"{h['train_accuracy']:.3f}", f"{h['val_accuracy']:.3f}",
          f"{h['val_accuracy_ema']:.3f}" if h.get("val_accuracy_ema") is not None else "—",
          h.get("kept", "trained") + (" *best" if h["best"] else ""), f"{h['lr_head']:.1e}",
          f"{h['lr_backbone']:.1e}" if h["lr_backbone"] else "frozen",
          f"{h.get('cpu_seconds', 0):.0f}") for h in hist])

    def pts(x: float) -> str:
        return f"{100 * (x - best_frozen):+.1f}"

    target = best_frozen + 0.02
    verdict_auto = [r["auto"] >= target - 1e-9 for r in runs]
    verdict = (f"target (re-extracted + `--head auto` >= best frozen + 2 points = {target:.3f}, "
               f"within 15 CPU-minutes): seeds {', '.join(str(r['seed']) for r in runs)} give "
               + ", ".join(f"{r['auto']:.3f} ({pts(r['auto'])}) in {r['cpu'] / 60:.1f} min"
                           for r in runs)
               + f"; mean {mean['auto']:.3f} ({pts(mean['auto'])} points); "
               + ("MET for every seed" if all(verdict_auto) and all(
                   r["cpu"] <= 900 for r in runs)
                  else f"met for {sum(verdict_auto)} of {len(runs)} seeds"))
    opts_text = ", ".join(f"{k}={v}" for k, v in asdict(base_opts).items()
                          if k not in ("seed", "device", "precision", "workers", "threads",
                                       "deterministic", "layout", "max_pixels",
                                       "keep_checkpoints", "budget", "weights", "model"))
    extra = [
        f"data: {data.relative_to(ROOT)} (bench/natural.py), {n} test images; heads fitted on "
        "the 170 train rows",
        f"finetune defaults: {opts_text}; each fine-tune in its own process (--jobs "
        f"{args.jobs} side by side) with one torch thread and no loader process (`--threads 1 "
        "--workers 0`: machine settings, not part of the recipe), so that CPU seconds count "
        "the work rather than OpenMP threads spinning on this shared machine",
        "extraction: `extract` defaults (frozen and tuned alike); `--head auto`: "
        "`heads.auto.fit_auto` defaults; logreg: its defaults",
        f"other processes kept {foreign:.2f} of {bu.cores()} cores busy on average (CPU "
        "seconds do not depend on it; wall time does)",
        f"**{verdict}**",
    ]
    if args.quick:
        extra.append("QUICK smoke-test run: 2 epochs, numbers mean nothing")
    text = (hdr.render(extra)
            + "\n## Test accuracy (71 images; 1 image = 1.4 points)\n\n" + main_table
            + "\n\n## Trade-off: CPU minutes of `finetune --budget` vs test accuracy "
              "(seed 0, the same run resumed)\n\n" + trade_table
            + f"\n\n## Fine-tuning history (seed {args.seeds[0]})\n\n" + hist_table + "\n")
    print(text)
    payload = {"frozen": frozen, "runs": runs, "points": points, "longer": longer,
               "options": asdict(base_opts)}
    dest = bu.save_results("finetune", text, payload, args.quick)
    log(f"wrote {dest}")


if __name__ == "__main__":
    main()
