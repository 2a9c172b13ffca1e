"""Does weight-space ensembling (WiSE-FT) make `finetune` pay on the natural set?

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022) keeps the
fine-tuned backbone's weights only part of the way: ``(1 - a) * pretrained + a * tuned`` for a
mixing coefficient ``a`` in [0, 1] (a = 1: the fine-tuned weights; a = 0: the pretrained ones).
It is reported to keep the fine-tune's gain where the data is like the training set and lose
less where it is not. Here, on bench/natural.py's 8 classes (170 train / 71 test):

  for each seed: `finetune` with its defaults (one torch thread, no loader process), then for
  a in ALPHAS the interpolated backbone (every floating-point tensor of the tuned state dict
  interpolated with the bundled Lite0's; BatchNorm statistics are frozen by the defaults, so
  they are the base's either way), `extract --weights` (defaults) and heads fitted on the 170
  train rows: `--head auto` (fit's default), and the logreg, svm and centroid defaults;
  also the frozen store and the tuned store side by side (2 stores stacked, as `fit a.h5 b.h5`).

Every number is test accuracy on the same 71 images (1 image = 1.4 points). The fine-tunes are
cached under cache/bench-finetune-wise (a rerun reuses them; delete the folder to redo them).

    python bench/finetune_wise.py                # seeds 0-8, 2 fine-tunes side by side
    python bench/finetune_wise.py --quick        # smoke test: 2 epochs, seed 0, scratch files

Writes bench/results/finetune_wise.md and .json (--quick: scratch files in the temp dir).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALPHAS = (0.25, 0.5, 0.75, 1.0)
HEADS = ("auto", "logreg", "svm", "centroid")


def cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def extract(data: Path, out: Path, weights: Path | None) -> None:
    from embedpipe.extract.local import run
    from embedpipe.extract.options import ExtractOptions

    if not out.exists():
        run(data, out, ExtractOptions(weights=str(weights) if weights else None, workers=0),
            progress=False)


def features(store: Path):
    from embedpipe.heads.rows import select_rows, targets
    from embedpipe.store import open_store

    s = open_store(store)
    r = select_rows(s)
    te = r.heldout["test"]
    return s.features[r.train], targets(s, r.train), s.features[te], targets(s, te)


def scores(xtr, ytr, xte, yte) -> dict:
    from embedpipe.heads import auto
    from embedpipe.heads.fit import fit_configuration
    from embedpipe.heads.source import Labeled

    out: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est, _, sel = auto.fit_auto(xtr, ytr)
        out["auto"] = float((np.asarray(est.predict(xte)) == yte).mean())
        out["auto_choice"] = sel.choice["name"]
        for h in HEADS[1:]:
            est, _ = fit_configuration(Labeled.in_memory(xtr, ytr), h, None)
            out[h] = float((np.asarray(est.predict(xte)) == yte).mean())
    return out


def wise(base: dict, tuned: dict, a: float) -> dict:
    """``(1 - a) * base + a * tuned`` for every floating-point tensor both hold with one shape;
    the tuned tensor elsewhere (integer counters)."""
    out = {}
    for k, v in tuned.items():
        b = base.get(k)
        out[k] = ((1 - a) * b + a * v if b is not None and v.is_floating_point()
                  and b.shape == v.shape else v)
    return out


def one_seed(args: tuple) -> dict:
    """Fine-tune ``seed`` (or reuse its run) and extract a store per alpha."""
    seed, work, quick = args
    import torch

    from embedpipe.backbones import load_backbone
    from embedpipe.finetune import FinetuneOptions, finetune

    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)
    import natural

    data = natural.build()
    out = work / f"tuned-s{seed}.pt"
    if not out.exists():
        extra = {"epochs": 2, "head_epochs": 1} if quick else {}
        finetune(data, out, FinetuneOptions(threads=1, workers=0, seed=seed, **extra),
                 overwrite=True, progress=False, say=lambda m: None)
    manifest = json.loads(out.with_suffix(".json").read_text())
    base = load_backbone().model.state_dict()
    tuned = torch.load(out, map_location="cpu", weights_only=True)
    for a in ALPHAS:
        w = work / f"wise-s{seed}-a{a}.pt"
        if not w.exists():
            torch.save(wise(base, tuned, a), w)
        extract(data, work / f"wise-s{seed}-a{a}.h5", w)
    return {"seed": seed, "finetune_cpu_s": manifest["cpu_seconds"],
            "kept_epoch": manifest["best_epoch"], "kept_weights": manifest.get("best_weights"),
            "weights_sha256": manifest["weights_sha256"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(9)))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import natural

    hdr = bu.Header("WiSE-FT on the natural set: the fine-tuned backbone interpolated with the "
                    "pretrained one")
    if args.quick:
        import tempfile
        args.seeds = args.seeds[:1]
        work = Path(tempfile.mkdtemp(prefix="finetune-wise-"))
    else:
        work = ROOT / "cache" / "bench-finetune-wise"
    work.mkdir(parents=True, exist_ok=True)
    data = natural.build()
    extract(data, work / "frozen.h5", None)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        runs = list(ex.map(one_seed, [(s, work, args.quick) for s in args.seeds]))
    frozen_f = features(work / "frozen.h5")
    frozen = scores(*frozen_f)
    per_seed: dict[int, dict] = {}
    for s in args.seeds:
        r = {}
        for a in ALPHAS:
            f = features(work / f"wise-s{s}-a{a}.h5")
            r[f"a={a}"] = scores(*f)
            if a == 1.0:
                r["frozen + tuned stacked"] = scores(np.hstack([frozen_f[0], f[0]]), f[1],
                                                     np.hstack([frozen_f[2], f[2]]), f[3])
        per_seed[s] = r
        print(s, {k: {h: round(v[h], 3) for h in HEADS} for k, v in r.items()},
              file=sys.stderr, flush=True)

    def fmt(x: float, n: int) -> str:
        return f"{x:.3f} ({round(x * n)}/{n})"

    n = 71
    rows = [["frozen (a = 0)", *[fmt(frozen[h], n) for h in HEADS], "—"]]
    keys = [f"a={a}" for a in ALPHAS] + ["frozen + tuned stacked"]
    for k in keys:
        means = [np.mean([per_seed[s][k][h] for s in args.seeds]) for h in HEADS]
        auto_each = " ".join(f"{per_seed[s][k]['auto']:.3f}" for s in args.seeds)
        rows.append([k + (" (fine-tuned)" if k == "a=1.0" else ""),
                     *[f"{m:.3f}" for m in means], auto_each])
    main_table = bu.table(["features", "--head auto (mean)", "logreg", "svm", "centroid",
                           "--head auto per seed"], rows)
    vs = []
    for k in keys:
        d = [per_seed[s][k]["auto"] - frozen["auto"] for s in args.seeds]
        vs.append([k, f"{100 * np.mean(d):+.1f}",
                   f"{100 * np.std(d, ddof=1) / np.sqrt(len(d)):.1f}" if len(d) > 1 else "—",
                   sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d)])
    vs_table = bu.table(["features", "auto vs frozen auto (points, mean)", "± s.e.",
                         "seeds above", "seeds below"], vs)
    run_table = bu.table(["seed", "fine-tune CPU s", "kept epoch (weights)", "sha256"],
                         [[r["seed"], r["finetune_cpu_s"], f"{r['kept_epoch']} ({r['kept_weights']})",
                           r["weights_sha256"][:12]] for r in runs])
    extra = [f"data: bench/natural.py (cache/natural/tuxpaint-8), 170 train / {n} test images; "
             f"seeds {', '.join(map(str, args.seeds))}",
             "finetune: its defaults with one torch thread and no loader process; extraction: "
             "`extract` defaults; heads: `heads.auto.fit_auto` defaults and each head's "
             "defaults for the data (fit_configuration)",
             "accuracies do not depend on machine load (seeded fits)"]
    body = ("\n## Test accuracy (71 images; means over the seeds)\n\n" + main_table +
            "\n\n## `--head auto` against the frozen store's, per seed\n\n" + vs_table +
            "\n\n## The fine-tunes\n\n" + run_table + "\n")
    bu.finish("finetune_wise", hdr, extra, body,
              {"frozen": frozen, "seeds": per_seed, "runs": runs, "alphas": ALPHAS},
              args.quick)


if __name__ == "__main__":
    main()
