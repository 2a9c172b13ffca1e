"""What a user asks of ``finetune``: ``FinetuneOptions``, their checks, the result, the outputs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import DEFAULT_MODEL, _io
from ..data import (
    DEFAULT_MAX_PIXELS,
    LAYOUTS,
    check_max_pixels,
)
from ..errors import UserError

FORMAT = "embedpipe-finetune/1"
CHECKPOINT_FORMAT = "embedpipe-finetune-checkpoint/1"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KEEP = ("best", "last")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")
STAGE_CONTAINERS = ("blocks", "stages", "layers")
RANDAUGMENT = "rand-m9-mstd0.5"
CROP_SCALE = (0.25, 1.0)  # RandomResizedCrop area range: milder than ImageNet's 0.08 for small data
ROTATION_DEGREES = 10.0
COLOR_JITTER = 0.3
MIN_LR_FACTOR = 0.01  # the cosine ends at 1% of each group's learning rate
PLOTS_HINT = "pip install 'embedpipe[plots]'"


class FinetuneError(UserError):
    """A bad option, data set or checkpoint; one line naming it and the fix."""


@dataclass
class FinetuneOptions:
    model: str = DEFAULT_MODEL
    weights: str | None = None
    epochs: int = 20
    head_epochs: int = 3
    unfreeze: int = 2
    gradual: bool = False
    stage_epochs: int = 1
    img_size: int | None = None
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    dropout: float = 0.2
    ema: float = 0.99  # decay of an EMA of the weights (0: none); loop.EMA
    bn_frozen: bool = True  # BatchNorm layers stay in eval mode (stages.set_train_mode)
    randaugment: bool = True
    cutmix: bool = False
    hflip: bool = True
    val_fraction: float = 0.2
    patience: int = 0
    keep: str = "last"  # the output: the last epoch, or the best validated one
    class_weight: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    deterministic: bool | None = None  # None: on for the CPU, off for CUDA
    layout: str = "auto"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    keep_checkpoints: int = 1  # 0 keeps every epoch's checkpoint
    budget: float | None = None  # CPU seconds this call may train (loop.cpu_seconds); None: no cap


# Options a resumed run must share with the checkpoint (they change the numbers); the others
# (device, precision, workers, deterministic, ...) may change, with a note that the continuation
# is then not bit-exact.
STRICT = ("model", "weights", "epochs", "head_epochs", "unfreeze", "gradual", "stage_epochs",
          "img_size", "batch_size", "lr", "head_lr", "weight_decay", "warmup_epochs",
          "label_smoothing", "dropout", "ema", "bn_frozen", "randaugment", "cutmix", "hflip",
          "val_fraction", "patience", "keep", "class_weight", "seed", "layout", "max_pixels")
SOFT = ("device", "precision", "workers", "threads", "deterministic")
# What a checkpoint written before ema, bn_frozen and keep existed ran with: such a run resumes
# with --ema 0 --bn-train --keep best (and is refused, naming them, with the newer defaults).
BEFORE_STUDY = {"ema": 0.0, "bn_frozen": False, "keep": "best"}
# budget and keep_checkpoints are in neither: they decide where a run stops and what is kept,
# not what an epoch computes (a run stopped by its budget resumes with any budget, or none).


@dataclass
class FinetuneResult:
    out: Path
    manifest: Path
    history_path: Path
    classifier: Path
    curves: Path | None
    checkpoint: Path | None
    model: str
    classes: list[str]
    n_train: int
    n_val: int
    best_epoch: int
    best_val_accuracy: float | None
    epochs_run: int
    stopped_early: bool
    seconds: float
    sha256: str
    img_size: int
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    left_out: int = 0
    stopped_by_budget: bool = False
    cpu_seconds: float = 0.0
    best_weights: str = "trained"  # or "ema"

    def line(self) -> str:
        kept = f"kept epoch {self.best_epoch} of {self.epochs_run}"
        if self.best_weights == "ema":
            kept += " (its EMA weights)"
        val = (f"{kept}, val accuracy {self.best_val_accuracy:.3f}"
               if self.best_val_accuracy is not None else f"no validation; {kept}")
        stop = ", stopped early" if self.stopped_early else ""
        if self.stopped_by_budget:
            stop += ", stopped by --budget"
        return (f"fine-tuned {self.model} on {self.n_train} images ({self.n_val} val), "
                f"{len(self.classes)} classes: {val}{stop} in {self.seconds:.0f} s "
                f"({self.cpu_seconds:.0f} CPU s) → {self.out} (sha256 {self.sha256[:12]}…, "
                f"manifest {self.manifest.name})")

    def extract_hint(self, data: str | Path) -> str:
        return (f"re-extract with: embedpipe extract {data} --model {self.model} --weights "
                f"{self.out} --img-size {self.img_size}")


# -- options, paths, checkpoints -----------------------------------------------------------

def check_options(opts: FinetuneOptions) -> None:
    def bad(option: str, value: Any, fix: str) -> None:
        raise FinetuneError(f"{option} {value}: {fix}")

    if opts.epochs < 1:
        bad("--epochs", opts.epochs, "pass 1 or more")
    if opts.head_epochs < 0:
        bad("--head-epochs", opts.head_epochs, "pass 0 or more (0 skips the head-only stage)")
    if opts.unfreeze < 0:
        bad("--unfreeze", opts.unfreeze, "pass 0 (classifier only) or the number of last "
            "feature stages to train")
    if opts.stage_epochs < 1:
        bad("--stage-epochs", opts.stage_epochs, "pass 1 or more")
    if opts.batch_size < 2:  # loop._train_epoch skips batches of one
        bad("--batch-size", opts.batch_size, "pass 2 or more (a batch of one image does not "
            "train; 16-32 is usual)")
    for option, v in (("--lr", opts.lr), ("--head-lr", opts.head_lr)):
        if not v > 0 or not math.isfinite(v):
            bad(option, v, "pass a positive learning rate such as 1e-4")
    if not 0 <= opts.weight_decay < 1:
        bad("--weight-decay", opts.weight_decay, "pass a value in [0, 1), e.g. 0.05")
    if not 0 <= opts.warmup_epochs < math.inf:
        bad("--warmup-epochs", opts.warmup_epochs, "pass 0 or more (a number of epochs)")
    if not 0 <= opts.label_smoothing < 1:
        bad("--label-smoothing", opts.label_smoothing, "pass a value in [0, 1), e.g. 0.1")
    if not 0 <= opts.ema < 1 or not math.isfinite(opts.ema):
        bad("--ema", opts.ema, "pass a decay in [0, 1), e.g. 0.99 (0: no EMA of the weights)")
    if not 0 <= opts.dropout < 1:
        bad("--dropout", opts.dropout, "pass a value in [0, 1), e.g. 0.2")
    if not 0 <= opts.val_fraction < 1:
        bad("--val-fraction", opts.val_fraction, "pass a value in [0, 1), e.g. 0.2")
    if opts.patience < 0:
        bad("--patience", opts.patience, "pass 0 (no early stopping) or more epochs")
    if opts.keep not in KEEP:
        bad("--keep", opts.keep, f"pass {' or '.join(KEEP)}")
    if opts.class_weight not in (None, "balanced"):
        bad("--class-weight", opts.class_weight, "pass balanced (or leave it out)")
    if opts.precision not in PRECISIONS:
        bad("--precision", opts.precision, f"pass one of {', '.join(PRECISIONS)}")
    if opts.layout not in LAYOUTS:
        bad("--layout", opts.layout, f"pass one of {', '.join(LAYOUTS)}")
    check_max_pixels(opts.max_pixels, FinetuneError)
    if opts.keep_checkpoints < 0:
        bad("--keep-checkpoints", opts.keep_checkpoints, "pass 0 (keep all) or more")
    if opts.workers is not None and opts.workers < 0:
        bad("--workers", opts.workers, "pass 0 (load in the main process) or more")
    if opts.budget is not None and (isinstance(opts.budget, bool) or not isinstance(
            opts.budget, (int, float)) or not math.isfinite(opts.budget) or opts.budget <= 0):
        bad("--budget", opts.budget, "pass the CPU seconds the training may use, a number > 0 "
            "(e.g. 900 for 15 CPU-minutes), or leave it out for no cap")
    if opts.threads is not None and opts.threads < 1:
        bad("--threads", opts.threads, "pass 1 or more (or leave it out for torch's default)")


@dataclass
class Outputs:
    weights: Path
    # an earlier run's checkpoints that --overwrite replaces: removed when this run has written
    # its first checkpoint (_save_checkpoint), so an interrupted start loses nothing
    stale_checkpoints: list[Path] = field(default_factory=list)
    # folders this run created (deepest first): removed again, when still empty, if the run
    # fails or is interrupted (remove_made), so a rerun finds things as they were
    made: list[Path] = field(default_factory=list)
    saving: Path | None = None  # the checkpoint being written
    last: Path | None = None  # the last checkpoint written, or the one resumed from

    def resumable(self) -> Path | None:
        """The newest checkpoint on disk that continues this run: the one being written when
        it exists (writes are atomic: complete or absent) and is not an earlier run's file of
        the same name, else the last one written; None before the first."""
        if self.saving is not None and self.saving not in self.stale_checkpoints \
                and self.saving.exists():
            return self.saving
        return self.last if self.last is not None and self.last.exists() else None

    def remove_made(self) -> None:
        """Remove the folders this run created that are still empty (rmdir: never a file)."""
        for folder in self.made:
            with contextlib.suppress(OSError):
                folder.rmdir()

    @property
    def stem(self) -> Path:
        return self.weights.with_suffix("")

    @property
    def manifest(self) -> Path:
        return self.stem.with_name(self.stem.name + ".json")

    @property
    def history(self) -> Path:
        return self.stem.with_name(self.stem.name + ".history.json")

    @property
    def classifier(self) -> Path:
        return self.stem.with_name(self.stem.name + ".classifier.pt")

    @property
    def curves(self) -> Path:
        return self.stem.with_name(self.stem.name + ".curves.png")

    @property
    def train_hashes(self) -> Path:
        """The sha256 of every image the run trains on, one hex digest a line, sorted: what
        `extract --weights` copies into a store so accuracies over those rows say so."""
        return self.stem.with_name(self.stem.name + ".train-hashes")

    @property
    def checkpoints(self) -> Path:
        return self.stem.with_name(self.stem.name + ".checkpoints")

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:03d}.pt"


def check_output(out: Path, resume: Path | None, overwrite: bool,
                 inputs: tuple[Any, ...] = ()) -> Outputs:
    if out.suffix.lower() not in WEIGHT_SUFFIXES:
        raise FinetuneError(f"-o {out}: pass a weights file name ending in .pt or .pth "
                            "(e.g. -o tuned.pt)")
    if out.is_dir():
        raise FinetuneError(f"-o {out} is a folder; pass a file name such as {out / 'tuned.pt'}")
    outs = Outputs(out)
    for path in (out, outs.manifest, outs.history, outs.classifier, outs.curves,
                 outs.train_hashes):
        if path.is_dir():
            raise FinetuneError(f"-o {out}: {path} (written beside it) is a folder; move it "
                                "away or pass another -o")
        _io.refuse_inputs(path, [resume, *inputs], flag="-o" if path == out else
                          f"-o (its {path.name})")
    if outs.checkpoints.exists() and not outs.checkpoints.is_dir():
        raise FinetuneError(f"-o {out}: {outs.checkpoints} (its checkpoint folder) is a file; "
                            "move it away or pass another -o")
    stale = [p for p in (out, outs.manifest) if p.exists()]
    stale += sorted(outs.checkpoints.glob("epoch-*.pt")) if outs.checkpoints.is_dir() else []
    if stale and resume is None and not overwrite:
        raise FinetuneError(f"-o {out}: {stale[0]} exists from an earlier run; pass --resume "
                            f"{outs.checkpoints} to continue it, --overwrite to start afresh, "
                            "or another -o")
    outs.made = list(itertools.takewhile(lambda p: not p.exists(), out.parents))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = _io.tmp_path(out, "probe")  # fail now, not after the first epoch
        probe.touch()
        probe.unlink()
    except OSError as e:
        outs.remove_made()
        file = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        if file is not None:
            raise FinetuneError(f"-o {out}: {file} is a file, not a folder; pass a path in a "
                                "folder") from None
        raise _io.write_failed(out, e, flag="-o") from None
    if resume is None:  # a fresh run: no checkpoint of the earlier one may be resumed by mistake
        outs.stale_checkpoints = [old for old in stale if old.parent == outs.checkpoints]
    return outs
