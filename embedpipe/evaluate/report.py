"""Reports of ``cv`` and ``compare``: text tables, JSON and plots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..heads.registry import _text, format_params
from ..heads.rows import METRICS, EvaluateError

PLOTS_HINT = "pip install 'embedpipe[plots]'"


def write_report(report: dict[str, Any], path: Any) -> None:
    import json
    from pathlib import Path

    from .. import _io

    stores = report.get("stores") or [report.get("store") or {}]
    _io.write_text(Path(path), json.dumps(report, indent=2) + "\n", flag="--json",
                   inputs=[s.get("path") for s in stores])


def _fmt_matrix(cm: dict[str, Any], indent: str = "  ") -> list[str]:
    labels, mat = cm["labels"], cm["matrix"]
    if len(labels) > 30:
        return [indent + f"({len(labels)} classes: too wide for a terminal; see --json or "
                "--plots)"]
    w = max([len(str(x)) for row in mat for x in row] + [len(str(len(labels) - 1)), 1])
    nw = max(len(c) for c in labels) + len(str(len(labels))) + 1
    head = indent + " " * nw + " " + " ".join(f"{j:>{w}}" for j in range(len(labels)))
    lines = [indent + "rows: true class, columns: predicted class (by number)", head]
    for i, (c, row) in enumerate(zip(labels, mat)):
        lines.append(indent + f"{f'{i} {c}':<{nw}} " + " ".join(f"{x:>{w}}" for x in row))
    return lines


def _params_per_fold(common: dict[str, Any], per_fold: dict[str, list[dict[str, Any]]],
                     search: bool, fixed: dict[str, Any] | None = None
                     ) -> tuple[str, list[str]]:
    """One head's parameters as fitted, as cv and compare print them: the ones every fit shares
    (``common``, registry.format_params) with a pointer to the lines below, and a line of the
    rest per fold for each label of ``per_fold`` (compare's '[A] ', cv's ''), their values
    fold by fold: ('prep=l2; rest searched, per fold below', ['chosen per fold: C=10 | C=1']).
    A value the user ``fixed`` (the head's --param values, short names) that differs by fold
    was not searched: fewshot.adapt lowered it where a fold's training rows were too few
    (knn's n_neighbors above them), so it has a line of its own saying so, with its value in
    every fold, and is left out of the searched ones."""
    own = {k: v for k, v in (fixed or {}).items() if not isinstance(common.get(k), dict)}
    lowered = [k for k in own if any(k in p for folds in per_fold.values() for p in folds)]
    rest = {label: [{k: v for k, v in p.items() if k not in lowered} for p in folds]
            for label, folds in per_fold.items()}
    text, lines = format_params(common), []
    if lowered:
        given = " ".join(f"{k}={_text(own[k])}" for k in lowered)
        text += f"; {given} (--param) lowered to fit the folds' rows, per fold below"
        lines = [f"{label}--param {given}, lowered to the fold's training rows (too few; see "
                 f"the notes): "
                 + " | ".join(format_params({k: p.get(k) for k in lowered}) for p in folds)
                 for label, folds in per_fold.items()]
    # nothing per fold under --search: every grid parameter was fixed by --param
    if not any(p for folds in rest.values() for p in folds):
        return text, lines
    text += "; rest searched, per fold below" if search else "; rest per fold below"
    return text, lines + [f"{label}{'chosen' if search else 'as fitted'} per fold: "
                          + " | ".join(format_params(p) for p in folds)
                          for label, folds in rest.items()]


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    st, metric = report["store"], report["metric"]
    held = ", ".join(f"{n} {k}" for k, n in st["heldout_rows"].items())
    out = [f"store    {st['path']}  ({st['model']}, {st['feature_dim']}-d, {st['rows']} rows)",
           f"data     {st['train_rows']} train rows in {len(st['classes'])} classes"
           + (f"; held out: {held}" if held else ""),
           f"folds    {report['splitter']} on the train rows in store order"
           + (f"; grid search with {report['inner_folds']} inner folds on each outer training "
              "part" if report["search"] else ""),
           f"chance   accuracy {report['chance']['majority_accuracy']:.3f} (majority class), "
           f"balanced accuracy {report['chance']['balanced_accuracy']:.3f}"]
    out += [f"warning  {w}" for w in report["warnings"]]
    out.append("")
    out.append(f"heads, best first by {METRICS[metric]} (mean ± std over "
               f"{report['folds'] * report['repeats']} folds):")
    hw = max(4, *(len(e["head"]) for e in report["heads"])) + 2
    out.append(f"  {'head':<{hw}}{'accuracy':<16}{'bal. accuracy':<16}{'macro-F1':<16}"
               f"{'fit s':>7}  params")
    for e in report["heads"]:
        cells = "".join(f"{e[m]['mean']:.3f} ± {e[m]['std']:.3f}".ljust(16) for m in METRICS)
        extra, per_fold = _params_per_fold(e["effective_params"],
                                           {"": [f["effective_params"] for f in e["folds"]]},
                                           report["search"], e.get("params"))
        if e["class_weight"]:
            extra += f" class_weight={e['class_weight']}"
        out.append(f"  {e['head']:<{hw}}{cells}{e['fit_seconds']:>7.2f}  {extra}")
        out += [f"  {'':<{hw}}{line}" for line in per_fold]
        if e["convergence_warnings"]:
            from ..heads.fit import convergence_note

            out.append(f"  {'':<{hw}}" + convergence_note(
                e["head"], e["convergence_warnings"],
                f"in {e['folds_with_convergence_warnings']} of {len(e['folds'])} folds",
                f"{e['head']}:"))
    b = report["best"]
    out += ["", f"best head: {b['head']}; out-of-fold predictions of the first repeat (each "
            "train row predicted once): " + ", ".join(
                f"{METRICS[m]} {b['out_of_fold'][m]:.3f}" for m in METRICS)]
    cw = max(len(r["class"]) for r in b["per_class"]) + 2
    out.append(f"  {'class':<{cw}}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}")
    for r in b["per_class"]:
        out.append(f"  {r['class']:<{cw}}{r['precision']:>10.3f}{r['recall']:>8.3f}"
                   f"{r['f1']:>8.3f}{r['support']:>9d}")
    out += ["", f"confusion matrix of {b['head']} (out-of-fold):"]
    out += _fmt_matrix(b["confusion_matrix"])
    if b["top_errors"]:
        out += ["", f"most confidently misclassified files by {b['head']} (confidence: "
                f"{b['confidence']}):"]
        for t in b["top_errors"]:
            out.append(f"  {t['confidence']:.3f}  {t['path']}  true {t['true']}, "
                       f"predicted {t['predicted']}")
    h = report["heldout"]
    if h:
        how = "grid-searched on" if h["searched"] else "refit on"
        out += ["", f"held-out splits: {h['head']} {how} all {st['train_rows']} train rows "
                f"({format_params(h['effective_params'])})"]
        for split, s in h["splits"].items():
            out.append(f"  {split}: {s['rows']} rows, " + ", ".join(
                f"{METRICS[m]} {s[m]:.3f}" for m in METRICS))
            if s["classes_not_in_train"]:
                out.append(f"    classes not in train (always wrong): "
                           f"{', '.join(s['classes_not_in_train'])}")
            out += _fmt_matrix(s["confusion_matrix"], indent="    ")
    v = report["versions"]
    out += ["", f"seed {report['seed']}; scikit-learn {v['sklearn']}, numpy {v['numpy']}, "
            f"embedpipe {v['embedpipe']}"]
    return "\n".join(out)


def write_plots(report: dict[str, Any], out_dir: Any) -> list[Any]:
    """``confusion_matrix.png`` (best head, out-of-fold) and ``scores.png`` (the metric per
    head, mean ± std over folds, with each fold's score) in ``out_dir``; needs matplotlib."""
    from pathlib import Path

    check_outputs(plots_dir=out_dir)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvaluateError(f"--plots {out_dir}: cannot create it ({e.strerror or e}); pass a "
                            "writable folder") from None
    written = []

    b = report["best"]
    labels, mat = b["confusion_matrix"]["labels"], np.array(b["confusion_matrix"]["matrix"])
    size = max(5.0, 0.55 * len(labels) + 2.5)
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(labels) <= 40:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if mat[i, j]:
                    ax.text(j, i, str(mat[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(f"{b['head']}: out-of-fold confusion matrix "
                 f"({report['store']['train_rows']} train rows)")
    fig.tight_layout()
    written.append(out_dir / "confusion_matrix.png")
    fig.savefig(written[-1], dpi=120)

    metric = report["metric"]
    rows = report["heads"]
    fig = Figure(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    means = [e[metric]["mean"] for e in rows]
    stds = [e[metric]["std"] for e in rows]
    ax.bar(x, means, yerr=stds, capsize=6, color="#4c72b0", alpha=0.8)
    for i, e in enumerate(rows):
        vals = [f[metric] for f in e["folds"]]
        ax.scatter(np.full(len(vals), i) + np.linspace(-0.2, 0.2, len(vals)), vals, s=10,
                   color="black", zorder=3)
    chance = report["chance"]["majority_accuracy" if metric == "accuracy"
                              else "balanced_accuracy"]
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, [e["head"] for e in rows])
    ax.set_ylabel(f"{METRICS[metric]} (mean ± std, dots: folds)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{Path(report['store']['path']).name}: {report['folds']}-fold CV"
                 + (f" x {report['repeats']} repeats" if report["repeats"] > 1 else "")
                 + f", seed {report['seed']}" + (", nested search" if report["search"] else ""),
                 fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    written.append(out_dir / "scores.png")
    fig.savefig(written[-1], dpi=120)
    return written


def format_compare(report: dict[str, Any]) -> str:
    metric = report["metric"]
    out = [f"{report['rows']} train rows common to all stores, {len(report['classes'])} "
           f"classes; {report['splitter']} on them sorted by path"
           + ("; nested grid search" if report["search"] else "")]
    out += [f"warning  {w}" for w in report["warnings"]]
    for k, s in enumerate(report["stores"]):
        out.append(f"  [{chr(65 + k)}] {s['path']}: {s['model']}, {s['weights']}, "
                   f"{s['feature_dim']}-d, {s['precision']}")
    out.append("")
    out.append(f"{METRICS[metric]}, mean ± std over {report['folds'] * report['repeats']} "
               "folds (same folds for every cell):")
    letters = [chr(65 + k) for k in range(len(report["stores"]))]
    hw = max(4, *(len(r["head"]) for r in report["heads"])) + 2
    head = f"  {'head':<{hw}}" + "".join(f"{'[' + x + ']':<16}" for x in letters)
    two = len(letters) == 2
    if two:
        head += "B − A (paired)       folds B>A / A>B"
    out.append(head)
    for r in report["heads"]:
        line = f"  {r['head']:<{hw}}" + "".join(
            f"{s[metric]['mean']:.3f} ± {s[metric]['std']:.3f}".ljust(16) for s in r["stores"])
        if two:
            d = r["difference"]
            line += (f"{d['mean']:+.3f} ± {d['std']:.3f}".ljust(21)
                     + f"{d['second_better']} / {d['first_better']}")
        out.append(line)
    out += ["", "parameters as fitted (the same in every store and fold unless named):"]
    for r in report["heads"]:
        text, per_fold = _params_per_fold(
            r["effective_params"], {f"[{x}] ": s["effective_params"]
                                    for x, s in zip(letters, r["stores"])}, report["search"],
            r.get("params"))
        out.append(f"  {r['head']:<{hw}}{text}")
        out += [f"  {'':<{hw}}{line}" for line in per_fold]
    return "\n".join(out)


def check_outputs(json_path: Any = None, plots_dir: Any = None, inputs: Any = ()) -> None:
    """Fail early (before any fitting) when the report or plots could not be written, or the
    report would be written over one of ``inputs`` (the stores)."""
    from pathlib import Path

    from .. import _io

    if json_path is not None:  # every check before the cross-validation, not after it
        _io.check_output(json_path, inputs, flag="--json", kind="a JSON report",
                         example="cv.json")

    if plots_dir is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EvaluateError(f"--plots {plots_dir}: matplotlib is not installed; "
                                f"{PLOTS_HINT} (or leave out --plots)") from None
        if Path(plots_dir).exists() and not Path(plots_dir).is_dir():
            raise EvaluateError(f"--plots {plots_dir}: exists and is not a folder; pass a "
                                "folder to write the PNGs into")
