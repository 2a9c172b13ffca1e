"""Prediction with a head file: from a feature store (torch-free) or end to end from images.

``from_store`` imports numpy, h5py, scikit-learn and skops only, so it runs where torch is not
installed. ``from_images`` extracts the images with exactly the backbone, weights, preprocessing
and precision recorded in the head (through extract.run, into a temporary or kept store), then
predicts from that store.
"""

from __future__ import annotations

import contextlib
import csv
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import _io, checks
from .errors import UserError
from .heads import artifacts
from .heads.compact import predict_scored
from .heads.reject import UNKNOWN, rule_for
from .heads.stream import DEFAULT_CHUNK_ROWS, check_chunk_rows
from .provenance import HEAD_KEYS, diff, members
from .store.read import FeatureStore, finetuned_note, open_stores

StorePaths = str | Path | Sequence[str | Path]  # several: stacked side by side (store.stack)


class PredictError(UserError):
    """Bad prediction input; one line naming it and the fix."""


@dataclass
class Predictions:
    head: Path
    classes: list[str]
    paths: list[str]
    labels: list[str | None]
    predicted: list[str]
    confidence: np.ndarray
    top: list[list[tuple[str, float]]]
    calibrated: bool
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rejected: int = 0  # rows labeled "unknown" by --reject

    def __len__(self) -> int:
        return len(self.paths)

    def accuracy(self) -> tuple[float, int] | None:
        known = [(t, p) for t, p in zip(self.labels, self.predicted) if t is not None]
        if not known:
            return None
        return sum(t == p for t, p in known) / len(known), len(known)

    def line(self) -> str:
        known = [(t, p) for t, p in zip(self.labels, self.predicted) if t is not None]
        return _summary(self.head, len(self), len(self.classes), len(known),
                        sum(t == p for t, p in known), len(self.skipped), self.rejected)

    def write_csv(self, out: str | Path | None, top_k: int) -> None:
        """path,label,predicted,confidence,top1,top1_prob,...; to ``out`` or stdout ("-")."""
        with CsvSink(out, top_k, len(self.classes), inputs=[self.head]) as sink:
            sink.write(self)


def _summary(head: Path, n: int, n_classes: int, labeled: int, correct: int,
             skipped: int, rejected: int = 0) -> str:
    text = f"predicted {n} images with {head} ({n_classes} classes)"
    if rejected:
        text += f"; {rejected} labeled {UNKNOWN} (--reject)"
    if labeled:
        text += f"; accuracy on the {labeled} labeled ones: {correct / labeled:.3f}"
    if skipped:
        text += f"; {skipped} skipped"
    return text


class CsvSink:
    """Writes the predictions CSV chunk by chunk: to stdout ("-" or None) as they come, or
    to a temporary file beside ``out`` renamed into place when complete (an interrupted run
    never leaves a partial CSV under the name asked for). The header is written with the
    first chunk, so an error before it (a damaged store) prints nothing but its one line."""

    def __init__(self, out: str | Path | None, top_k: int, n_classes: int,
                 inputs: Sequence[str | Path | None] = ()):
        self.k = min(top_k, n_classes)
        self._out = None if out is None or str(out) == "-" else Path(out)
        self._stack = contextlib.ExitStack()
        if self._out is None:
            self._f: Any = sys.stdout
        else:
            tmp = self._stack.enter_context(_io.atomic_output(self._out, inputs=inputs))
            try:
                self._f = self._stack.enter_context(
                    open(tmp, "w", newline="", encoding="utf-8"))
            except OSError as e:
                self._stack.close()
                raise _io.write_failed(self._out, e) from None
        self._w = csv.writer(self._f)
        self._started = False

    def _header(self) -> None:
        head = ["path", "label", "predicted", "confidence"]
        for i in range(1, self.k + 1):
            head += [f"top{i}", f"top{i}_prob"]
        self._w.writerow(head)
        self._started = True

    def write(self, preds: "Predictions") -> None:
        try:
            if not self._started:
                self._header()
            for p, t, pred, conf, top in zip(preds.paths, preds.labels, preds.predicted,
                                             preds.confidence, preds.top):
                row = [p, t or "", pred, f"{conf:.6f}"]
                for c, prob in top[:self.k]:
                    row += [c, f"{prob:.6f}"]
                self._w.writerow(row)
            self._f.flush()
        except OSError as e:
            if self._out is None:
                raise
            raise _io.write_failed(self._out, e) from None

    def __enter__(self) -> "CsvSink":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and not self._started:  # no rows: the header alone
            self.write(Predictions(Path(), [], [], [], [], np.zeros(0), [], True))
        # closes the file, then renames it into place (or removes it after an error)
        self._stack.__exit__(exc_type, exc, tb)


def predict_rows(head: artifacts.HeadFile, X: np.ndarray, top_k: int
                 ) -> tuple[list[str], np.ndarray, list[list[tuple[str, float]]], bool]:
    """Predicted class, its probability, and the top-k (class, probability) of each row."""
    classes = head.classes
    if X.shape[0] == 0:
        return [], np.zeros(0), [], True
    manifest = head.manifest
    use_proba = artifacts.probability_kind(manifest) != "scores"
    pred, probs, conf, calibrated = predict_scored(head.estimator, X, use_proba=use_proba)
    predicted = [str(p) for p in pred]
    order = np.argsort(-probs, axis=1, kind="stable")[:, :max(1, top_k)]
    top = [[(classes[j], float(probs[i, j])) for j in row] for i, row in enumerate(order)]
    return predicted, conf, top, calibrated


def _notes(head: artifacts.HeadFile, labels: set[str], calibrated: bool) -> list[str]:
    notes = []
    if not calibrated:
        notes.append(f"note: {head.path} has no calibrated probabilities; confidence is a "
                     "softmax of its decision scores (a ranking, not a probability)")
    unknown = sorted(labels - set(head.classes))
    if unknown:
        notes.append(f"note: {len(unknown)} true class(es) are unknown to the head "
                     f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); "
                     "those images count as errors")
    return notes


def _fitted_rows_note(head: artifacts.HeadFile, store: FeatureStore, rows: np.ndarray,
                      split: str | None, only: set[str] | None,
                      from_images: bool = False) -> list[str]:
    """A note when ``rows`` of ``store`` include rows ``head`` was fitted on: its accuracy on
    them overrates it. [] otherwise.

    A head that records its training rows (artifacts.save's ``fitted_rows``: their images'
    content hashes) counts the labeled rows whose image is among them, in any store (a copy,
    a store that grew after the fit, the images of `predict HEAD IMAGES`). An older head
    without the record falls back to the store it was fitted on (by its store_id or the same
    file): its train split, or every labeled row when it had none."""
    record = head.fitted_row_keys()
    if record is not None:
        return _recorded_rows_note(head, store, rows, record, from_images)
    from .store.schema import STORE_ID

    training = head.manifest.get("training", {})
    if only is not None or "stores" in training or not training.get("store"):
        return []
    sid = training.get("store_id")
    same = (store.meta.get(STORE_ID) == sid if sid else False) or _io.same_file(
        store.path, training["store"])
    if not same:
        return []
    labeled = store.labels[rows] >= 0
    if training.get("split") == "train":
        labeled &= np.asarray(store.splits, dtype=object)[rows] == "train"
    n = int(labeled.sum())
    if not n:
        return []
    held = sorted({str(s) for s in np.asarray(store.splits, dtype=object)[rows]
                   if s and s != "train"})
    fix = (f"pass --split {held[0]} to score the held-out rows only" if held
           else "`embedpipe cv` estimates its accuracy on images it has not seen")
    return [f"note: {n} of these rows are the ones {head.path} was fitted on, so the accuracy "
            f"over them overrates it; {fix}"]


def _recorded_rows_note(head: artifacts.HeadFile, store: FeatureStore, rows: np.ndarray,
                        record: np.ndarray, from_images: bool) -> list[str]:
    """_fitted_rows_note for a head with a record of its training rows (``record``:
    HeadFile.fitted_row_keys): the labeled ``rows`` whose image hash is in it."""
    labeled = rows[store.labels[rows] >= 0]
    seen = artifacts.fitted_mask(record, [store.hashes[i] for i in labeled])
    n = int(seen.sum())
    if not n:
        return []
    what = "images" if from_images else "rows"
    if from_images:
        fix = "predict images it was not fitted on to measure it"
    else:  # a split of the store whose labeled rows are all unseen, else cv
        splits = np.asarray(store.splits, dtype=object)
        every = np.flatnonzero(store.labels >= 0)
        mask = artifacts.fitted_mask(record, [store.hashes[i] for i in every])
        clean = sorted({str(sp) for sp in splits[every[~mask]] if sp}
                       - {str(sp) for sp in splits[every[mask]]})
        pick = "test" if "test" in clean else (clean[0] if clean else None)
        fix = (f"pass --split {pick} to score rows it was not fitted on" if pick
               else "`embedpipe cv` estimates its accuracy on images it has not seen")
    return [f"note: {n} of the {len(labeled)} labeled {what} scored are images {head.path} was "
            f"fitted on, so the accuracy over them overrates it; {fix}"]


def _rows(store: FeatureStore, split: str | None, only: set[str] | None) -> np.ndarray:
    keep = np.ones(len(store), dtype=bool)
    if split is not None:
        keep &= np.asarray(store.splits, dtype=object) == split
        if not keep.any():
            have = sorted({s or "(none)" for s in store.splits})
            raise PredictError(f"{store.path}: no rows in split {split!r}; pass one of "
                               f"{', '.join(have)} or leave --split out")
    if only is not None:
        keep &= np.array([p in only for p in store.paths], dtype=bool)
    return np.flatnonzero(keep)


def iter_store(head_path: str | Path, store_path: StorePaths, *, top_k: int = 3,
               split: str | None = None, only: set[str] | None = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = False,
               reject: str | None = None, from_images: bool = False
               ) -> tuple[artifacts.HeadFile, int, list[str], Iterator[Predictions]]:
    """Classify the rows of a store (optionally one split, or only the given paths) in chunks
    of ``chunk_rows`` rows, in store order: (head, rows, notes, one Predictions per chunk).
    Memory is bounded by the chunk, not the store (stacked stores, several paths, are held in
    memory). ``notes`` fills as chunks are made. ``reject`` (auto, none or a confidence; see
    heads.reject.rule_for) labels ``unknown`` the rows the head should not decide; their
    confidence and top-k stay as the head scored them. ``from_images``: the store is one
    predict_images extracted for this call (temporary), so notes name the head and images."""
    from .progress import Progress

    check_chunk_rows(chunk_rows)
    head = artifacts.load(head_path, compact=True)
    rule = rule_for(head.manifest, reject, str(head.path))
    store = open_stores(store_path, features=False)
    notes = artifacts.check_compatible(head, store.meta, str(store.path)) + store.notes
    rows = _rows(store, split, only)
    names = store.label_names()
    notes += _fitted_rows_note(head, store, rows, split, only, from_images)
    # the accuracy is over the labeled rows: those the backbone was fine-tuned on overrate it
    labeled = rows[store.labels[rows] >= 0]
    _, seen = (finetuned_note(store, labeled, "labeled images scored", of=str(head.path),
                              fix="predict images finetune did not see") if from_images
               else finetuned_note(store, labeled, "labeled rows scored"))
    notes += [f"note: {seen}"] if seen else []

    def chunks() -> Iterator[Predictions]:
        calibrated = True
        with Progress(len(rows), "predict", enabled=progress, unit="row") as bar:
            for idx, X in store.iter_feature_chunks(rows, chunk_rows):
                sel = rows[idx]
                # NaN/inf features would come out as confidence "nan": refuse, naming them
                checks.refuse_unusable_chunk(X, store, rows, chunk_rows)
                X = X.astype(np.float32, copy=False)
                predicted, conf, top, cal = predict_rows(head, X, top_k)
                calibrated &= cal
                n_rejected = 0
                if rule is not None and len(sel):
                    unknown = rule.mask(conf, X)
                    predicted = [UNKNOWN if u else p for p, u in zip(predicted, unknown)]
                    n_rejected = int(unknown.sum())
                bar.update(len(sel))
                yield Predictions(head.path, head.classes, [store.paths[i] for i in sel],
                                  [names[i] for i in sel], predicted, conf, top, cal,
                                  rejected=n_rejected)
        labels = {names[i] for i in rows if names[i] is not None}
        notes.extend(_notes(head, labels, calibrated))
        if rule is not None:
            notes.append(f"note: --reject {rule.source}: rows labeled {UNKNOWN} count as "
                         "errors in the accuracy")

    return head, len(rows), notes, chunks()


def from_store(head_path: str | Path, store_path: StorePaths, *, top_k: int = 3,
               split: str | None = None, only: set[str] | None = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS, reject: str | None = None,
               from_images: bool = False) -> Predictions:
    """Classify the rows of a store (optionally one split, or only the given paths), all
    collected in memory (see iter_store and to_csv for the streamed form)."""
    head, _, notes, chunks = iter_store(head_path, store_path, top_k=top_k, split=split,
                                        only=only, chunk_rows=chunk_rows, reject=reject,
                                        from_images=from_images)
    out = Predictions(head.path, head.classes, [], [], [], np.zeros(0), [], True, notes)
    confs = []
    for p in chunks:
        out.paths += p.paths
        out.labels += p.labels
        out.predicted += p.predicted
        out.top += p.top
        out.rejected += p.rejected
        confs.append(p.confidence)
        out.calibrated &= p.calibrated
    out.confidence = np.concatenate(confs) if confs else np.zeros(0)
    return out


@dataclass
class StreamSummary:
    head: Path
    rows: int
    classes: int
    labeled: int
    correct: int
    notes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rejected: int = 0

    def line(self) -> str:
        return _summary(self.head, self.rows, self.classes, self.labeled, self.correct,
                        len(self.skipped), self.rejected)


def to_csv(head_path: str | Path, store_path: StorePaths, out: str | Path | None, *,
           top_k: int = 3, split: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
           progress: bool = False, reject: str | None = None) -> StreamSummary:
    """`predict --store`: classify a store's rows chunk by chunk and write each chunk's CSV
    rows as it is done; memory is bounded by ``chunk_rows``, not the store. An ``out`` that is
    the head or one of the stores is refused before anything is read (OutputError)."""
    stores = [store_path] if isinstance(store_path, (str, Path)) else list(store_path)
    if out is not None and str(out) != "-":
        _io.check_output(out, [head_path, *stores], kind="a CSV", example="predictions.csv")
    head, n, notes, chunks = iter_store(head_path, store_path, top_k=top_k, split=split,
                                        chunk_rows=chunk_rows, progress=progress, reject=reject)
    labeled = correct = rejected = 0
    with CsvSink(out, top_k, len(head.classes), inputs=[head_path, *stores]) as sink:
        for p in chunks:
            sink.write(p)
            known = [(t, q) for t, q in zip(p.labels, p.predicted) if t is not None]
            labeled += len(known)
            correct += sum(t == q for t, q in known)
            rejected += p.rejected
    return StreamSummary(head.path, n, len(head.classes), labeled, correct, notes,
                         rejected=rejected)


# -- end to end from images ------------------------------------------------------------------

def not_an_image(path: Path) -> str | None:
    """A one-line error for one of embedpipe's own files (artifacts.file_kind: a feature
    store, a features file, a head file, weights, an ONNX export) given where images belong:
    what it is and what to do with it instead. None for any other file (an image, or a file
    that is skipped as undecodable later). Torch-free; reads the file's first bytes only."""
    found = artifacts.file_kind(path)
    if found is None:
        return None
    what, kind = found
    text = f"{path} is {what}, not an image; "
    if kind == "store":
        return text + (f"classify its rows with `embedpipe predict HEAD --store {path}` (a head "
                       "fitted on the store's backbone), or pass image files or folders")
    if kind == "features":
        store = path.with_suffix(".h5")
        return text + (f"import it into a store (`embedpipe import-features {path} -o {store}`) "
                       f"and classify its rows with `embedpipe predict HEAD --store {store}` (a "
                       "head fitted on those imported features), or pass image files or folders")
    if kind == "head":
        return text + ("pass one head first, then images: `embedpipe predict HEAD "
                       "IMAGES...`")
    return text + "pass image files, folders or a .csv manifest"


def gather_images(inputs: Sequence[str | Path]) -> Any:
    """One Discovery over image files, folders (any layout: class folders give true labels)
    and CSV manifests, keyed by the paths as the user wrote them. PredictError (one line) for
    a path that does not exist, or a file that is one of embedpipe's own (not_an_image)."""
    from .data import Discovery, ImageRef, discover, display_name

    items: dict[Path, ImageRef] = {}
    ignored: list[tuple[str, str]] = []
    for given in inputs:
        p = Path(given)
        shown = display_name(p.as_posix())
        if p.is_dir() or p.suffix.lower() == ".csv":
            disc = discover(p)
            base = shown if p.is_dir() else p.parent.as_posix()
            prefix = "" if base in ("", ".") else base.rstrip("/") + "/"
            for ref in disc.items:
                rel = ref.rel if Path(ref.rel).is_absolute() else prefix + ref.rel
                items.setdefault(ref.path.resolve(), ImageRef(ref.path, rel, ref.label,
                                                              ref.split))
            ignored += [(prefix + r, why) for r, why in disc.ignored]
        elif p.is_file():
            other = not_an_image(p)
            if other is not None:
                raise PredictError(other)
            items.setdefault(p.resolve(), ImageRef(p.resolve(), shown, None, None))
        else:
            raise PredictError(f"{given}: no such file or folder; pass image files, folders or "
                               "a .csv manifest")
    refs = sorted(items.values(), key=lambda r: r.rel)
    labels = sorted({r.label for r in refs if r.label is not None})
    return Discovery(Path.cwd(), "images", refs, labels, sorted(ignored))


def from_images(head_path: str | Path, inputs: Sequence[str | Path], *, top_k: int = 3,
                weights: str | None = None, device: str = "auto", batch_size: int = 32,
                workers: int | None = None, keep_store: str | Path | None = None,
                progress: bool = True, runtime: str = "auto", out: str | Path | None = None,
                reject: str | None = None, say: Callable[[str], None] | None = None,
                notice: Callable[[str], None] | None = None) -> Predictions:
    """Extract ``inputs`` with the head's own backbone and preprocessing, then classify.
    ``runtime`` auto: the runtime that made the head's features where it matters (bf16: torch
    or OpenVINO), else as `extract --runtime auto` (fp32 features are the same). ``out``: the
    CSV the caller will write (Predictions.write_csv); refused here, before any work, when it is
    the head or one of ``inputs`` (OutputError), as is a ``keep_store`` that is the head, the
    CSV or an input. ``reject``: as predict --reject (heads.reject.rule_for). ``say`` and
    ``notice``: as extract.local.run's."""
    from .extract.options import options_for_identity

    if out is not None and str(out) != "-":
        _io.check_output(out, [head_path, *inputs, keep_store], kind="a CSV",
                         example="predictions.csv")
    if keep_store is not None:
        _io.refuse_inputs(keep_store, [head_path, *inputs], flag="--keep-store")
        _io.check_writable(keep_store, flag="--keep-store")  # an existing store is reused

    head = artifacts.load(head_path, compact=True)  # its manifest: no scikit-learn needed
    rule_for(head.manifest, reject, str(head.path))  # a bad --reject fails before extracting
    idents = members(head.identity)  # a head on stacked stores: each backbone's
    _refuse_alike(head, idents)
    if weights is not None and len(idents) > 1:
        raise PredictError(f"--weights {weights}: {head.path} stacks {len(idents)} backbones; "
                           "--weights is for heads of one backbone: leave it out")
    options = [options_for_identity(ident, weights=weights, what=str(head.path), device=device,
                                    batch_size=batch_size, workers=workers, runtime=runtime)
               for ident in idents]
    disc = gather_images(inputs)
    if not disc.items:
        raise PredictError(f"{', '.join(map(str, inputs))}: no images found; pass image files "
                           "(jpg, png, ...) or folders holding them")
    if out is not None and str(out) != "-":  # an image inside a folder (or manifest) given
        _io.refuse_among(out, [r.path for r in disc.items])
    with tempfile.TemporaryDirectory(prefix="embedpipe-predict-") as tmp:
        stores, skipped = extract_images(disc, options, Path(tmp), keep_store=keep_store,
                                         progress=progress, say=say, notice=notice)
        preds = from_store(head.path, stores, top_k=top_k, only={r.rel for r in disc.items},
                           reject=reject, from_images=True)
    preds.skipped = skipped
    return preds


def _refuse_alike(head: artifacts.HeadFile, idents: list[dict[str, Any]]) -> None:
    """Refuse (PredictError) to predict images with a head stacked on stores of one backbone
    and the same extraction options (identity: nothing but their files told them apart, e.g.
    stores of other images under the same paths): from images, each would be extracted the
    same way, which is not what it was fitted on. The line names the fix: predict from stores
    made as its own were."""
    alike = [(i, j) for j in range(len(idents)) for i in range(j)
             if not diff(idents[i], idents[j], HEAD_KEYS)]
    if not alike:
        return
    i, j = alike[0]
    stores = head.manifest.get("training", {}).get("stores") or []
    names = " + ".join(Path(str(s)).name for s in stores) or "its stores"
    raise PredictError(f"{head.path}: stacked stores {i + 1} and {j + 1} ({names}) were made "
                       "with the same backbone and extraction options, so from images both "
                       "would be extracted alike, unlike the stores it was fitted on; make a "
                       "store of the images for each as that store was made, and pass them "
                       "with --store A --store B in the head's order")


def extract_images(disc: Any, options: Sequence[Any], tmp: Path, *,
                   keep_store: str | Path | None = None, progress: bool = True,
                   say: Callable[[str], None] | None = None,
                   notice: Callable[[str], None] | None = None
                   ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Extract the images of ``disc`` (see gather_images) once per ExtractOptions in
    ``options`` (one per backbone), through extract.run, into stores under ``tmp`` (or
    ``keep_store``: x.h5, or x.1.h5, x.2.h5, ... for several backbones). Returns the store
    paths (one per options, in order) and the (path, reason) of images that were skipped
    (unreadable, not images). Ctrl-C during extraction raises KeyboardInterrupt."""
    from .extract.local import run

    skipped: dict[tuple[str, str], None] = {}
    stores = []
    for i, opts in enumerate(options):
        if keep_store and len(options) > 1:  # x.h5 -> x.1.h5, x.2.h5: one per backbone
            store = Path(keep_store).with_suffix(f".{i + 1}{Path(keep_store).suffix}")
        else:
            store = Path(keep_store) if keep_store else Path(tmp) / f"features{i}.h5"
        summary = run(disc, store, opts, progress=progress, say=say, notice=notice)
        if summary.interrupted:
            raise KeyboardInterrupt
        skipped.update(dict.fromkeys([*summary.failures, *summary.ignored_files]))
        if summary.extracted + summary.replaced + summary.unchanged == 0:
            raise none_usable(disc, list(skipped))
        stores.append(store)
    return stores, list(skipped)


def none_usable(disc: Any, skipped: list[tuple[str, str]]) -> PredictError:
    """The one-line error when not one of the images given could be read (all of them
    skipped): predicting or searching nothing and exiting 0 would look like success."""
    n = len(disc.items)
    why = "; ".join(f"{p}: {r}" for p, r in skipped[:2])
    more = f"; and {len(skipped) - 2} more" if len(skipped) > 2 else ""
    return PredictError(f"none of the {n} image{'s' if n != 1 else ''} given could be read "
                        f"({why}{more}); pass image files that open "
                        "(jpg, png, ...)")
