"""Commands that score rows with an svm head in memory: scikit-learn (libsvm) against the
head's compact form (compact.fast_form).

`predict --store` reads a head file's compact form (bench/svm_predict.py). The commands that
score a head they have just fitted — cv's folds, fit's training accuracy, `--head auto`'s
selection — score through compact.predict_scored / class_scores, which take the compact form
of a head holding an SVC from compact.FAST_ENTRIES kernel values. This bench runs the same
commands, as a user does (the installed CLI, a subprocess), with that threshold as shipped
and with it set out of reach (scikit-learn scores every row), interleaved, and compares
their output lines (they must be identical apart from timings):

* `embedpipe cv STORE --head svm --folds 3` (3 folds of the train rows, then a refit scored
  on the test split);
* `embedpipe fit STORE --head svm` (its training accuracy on 5,000 of the rows).

Store: the Fashion-MNIST bundled-Lite0 store of bench/heads.py, 10,000 train / 2,000 test
rows. CPU seconds (user + sys of the subprocess) are the figure to compare on a shared
machine; wall seconds are printed too.

    python bench/svm_scoring.py            # 3 interleaved repetitions
    python bench/svm_scoring.py --quick    # 1 repetition; scratch result in /tmp

Writes bench/results/svm_scoring.md and svm_scoring.json.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

# the CLI with compact.FAST_ENTRIES out of reach: every row scored by scikit-learn
SKLEARN_ONLY = ("import sys; from embedpipe.heads import compact; compact.FAST_ENTRIES = 10**18;"
                " from embedpipe.cli import main; sys.argv[0] = 'embedpipe'; sys.exit(main())")


def _untimed(out: str) -> list[str]:
    """Output lines without what differs from run to run (seconds, rates, paths of temp files)."""
    return [re.sub(r"\d+(\.\d+)? s\b|in [\d.]+ s|fit s|\s+\d+\.\d\d  (?=prep=)", "#", line)
            for line in out.splitlines()]


def main() -> None:
    args, reps = bu.reps_args(3)
    hdr = bu.Header("svm head: scoring in cv and fit, scikit-learn vs the compact form")
    _, path, _ = bu.fmnist_features(1000, 200)
    tmp = Path(tempfile.mkdtemp(prefix="bench-svm-scoring-"))
    commands = {
        "cv --head svm --folds 3": ["cv", path, "--head", "svm", "--folds", "3"],
        "fit --head svm": ["fit", path, "--head", "svm", "-o", tmp / "svm.skops"],
    }
    ways = {"scikit-learn": [sys.executable, "-c", SKLEARN_ONLY],
            "compact form": bu.cli_command()}
    got: dict[tuple[str, str], list[tuple[float, float]]] = {}
    outputs: dict[tuple[str, str], list[str]] = {}
    for rep in range(reps):
        for label, cmd in commands.items():
            order = list(ways.items())
            if rep % 2:
                order.reverse()
            for way, prefix in order:
                wall, cpu, res = bu.timed(prefix + [str(a) for a in cmd])
                got.setdefault((label, way), []).append((cpu, wall))
                outputs[(label, way)] = _untimed(res.stdout)
                print(f"{label}, {way}: {cpu:.1f} CPU s, {wall:.1f} s wall", file=sys.stderr,
                      flush=True)
    rows, payload = [], {"commands": {}}
    for label in commands:
        a, b = outputs[(label, "scikit-learn")], outputs[(label, "compact form")]
        if a != b:
            diff = next(f"{x!r} vs {y!r}" for x, y in zip(a + [""], b + [""]) if x != y)
            raise SystemExit(f"{label}: the outputs differ: {diff}")
        s, f = got[(label, "scikit-learn")], got[(label, "compact form")]
        sc, fc = bu.median([x[0] for x in s]), bu.median([x[0] for x in f])
        sw, fw = bu.median([x[1] for x in s]), bu.median([x[1] for x in f])
        rows.append((f"`embedpipe {label}`", f"{sc:.1f}", f"{fc:.1f}", f"{sc / fc:.2f}x",
                     f"{sw:.1f}", f"{fw:.1f}", f"{sw / fw:.2f}x"))
        payload["commands"][label] = {"scikit-learn": s, "compact form": f}
    body = ("\n## The whole command (median of the repetitions; output identical apart from "
            "timings)\n\n" + bu.table(
                ["command (10,000 train / 2,000 test rows)", "scikit-learn CPU s",
                 "compact CPU s", "CPU ratio", "scikit-learn wall s", "compact wall s",
                 "wall ratio"], rows) + "\n")
    extra = [f"store: {path.name} (bundled Lite0 features); {reps} interleaved repetitions",
             "scikit-learn: the same CLI with compact.FAST_ENTRIES set out of reach",
             "CPU seconds are the figure to compare on a loaded machine"]
    bu.finish("svm_scoring", hdr, extra, body, payload, args.quick)


if __name__ == "__main__":
    main()
