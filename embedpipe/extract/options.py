"""What a user asks of ``extract``: ``ExtractOptions``, their checks, the run ``Summary`` and
the default store path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from typing import TYPE_CHECKING

from .. import DEFAULT_MODEL
from ..data import (
    DEFAULT_MAX_PIXELS,
    check_max_pixels,
)
from ..errors import UserError
from ..provenance import options_for, parse_tta

if TYPE_CHECKING:  # imported where used: a no-op rerun never imports torch or timm

    pass



PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILES = ("auto", "on", "off")
RUNTIMES = ("auto", "torch", "openvino")
DTYPES = ("float32", "float16")


class ExtractError(UserError):
    """A bad option or environment; one line naming the problem and the fix."""


@dataclass
class ExtractOptions:
    model: str = DEFAULT_MODEL
    weights: str | None = None
    random_init: bool = False
    pool: str | None = None
    img_size: int | None = None
    crop_pct: float | None = None
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float32"
    batch_size: int = 32
    workers: int | None = None
    layout: str = "auto"
    exact_decode: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    prune: bool = False
    channels_last: bool = True
    shard: str | None = None  # "K/N": only the files of shard K of N (merge with store.merge)
    tta: str | None = None  # test-time augmentation: "flip", "crops" or "flip,crops"
    compile: str = "auto"  # torch.compile the backbone: auto, on, off (not part of the identity)
    runtime: str = "auto"  # auto, torch, openvino (runtime.py; in the identity via precision)


@dataclass
class Summary:
    store: Path
    total: int = 0
    extracted: int = 0
    replaced: int = 0
    unchanged: int = 0
    failed: int = 0
    ignored: int = 0
    vanished: list[str] = field(default_factory=list)
    # every stored row vanished (none of the store's files is among this run's): another
    # dataset or moved images, never a case for --prune (which would empty the store)
    all_vanished: bool = False
    stale: list[str] = field(default_factory=list)  # changed files that no longer decode
    pruned: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    ignored_files: list[tuple[str, str]] = field(default_factory=list)
    device: str = ""
    precision: str = ""
    compiled: str = ""  # "", "compiled" or "eager (compile failed)"
    runtime: str = ""  # "torch" or "openvino <version> (cache hit|miss|rebuilt|off)"
    pipeline: str = ""  # where decoding ran: "1 decode worker", "decode in-process"
    interrupted: bool = False

    @property
    def rate(self) -> float:
        done = self.extracted + self.replaced
        return done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        parts = [f"{self.extracted} extracted"]
        if self.replaced:
            parts.append(f"{self.replaced} changed and re-extracted")
        parts.append(f"{self.unchanged} already in store")
        parts.append(f"{self.failed} failed")
        if self.ignored:
            parts.append(f"{self.ignored} ignored")
        if self.stale:
            parts.append(f"{len(self.stale)} changed but undecodable (old rows kept)")
        if self.vanished:
            parts.append(f"{len(self.vanished)} vanished")
        if self.pruned:
            parts.append(f"{self.pruned} pruned")
        head = "interrupted" if self.interrupted else "done"
        how = ", ".join(x for x in (self.device, self.runtime, self.precision, self.compiled,
                                    self.pipeline) if x)
        return (f"{head}: {', '.join(parts)} of {self.total} images in {self.seconds:.1f} s "
                f"({self.rate:.1f} img/s, {how}) → {self.store}")


def check_options(opts: ExtractOptions) -> None:
    """Fail on a bad option before anything is loaded."""
    if opts.batch_size < 1:
        raise ExtractError(f"--batch-size {opts.batch_size}: pass a positive number")
    if opts.workers is not None and opts.workers < 0:
        raise ExtractError(f"--workers {opts.workers}: pass 0 (decode in the main process) or "
                           "more, or leave it out for the default")
    if opts.dtype not in DTYPES:
        raise ExtractError(f"--dtype {opts.dtype}: pass float32 or float16")
    if opts.compile not in COMPILES:
        raise ExtractError(f"--compile {opts.compile}: pass one of {', '.join(COMPILES)}")
    if opts.runtime not in RUNTIMES:
        raise ExtractError(f"--runtime {opts.runtime}: pass one of {', '.join(RUNTIMES)}")
    check_max_pixels(opts.max_pixels, ExtractError)
    if opts.tta is not None:
        parse_tta(opts.tta)


# Options that decide the features a run stores (the rest only change speed or what is planned).
_IDENTITY_OPTIONS = ("model", "weights", "random_init", "pool", "img_size", "crop_pct", "dtype",
                     "exact_decode", "tta")


def default_store_path(source: str | Path, opts: ExtractOptions, cache_dir: Path) -> Path:
    """cache/<data>__<model>__<weights>.h5, so different backbones never share a store."""
    src = Path(source).resolve()
    data = src.stem if src.is_file() else src.name
    if opts.random_init:
        w = "random"
    elif opts.weights in (None, "auto", "bundled", "hub"):
        w = opts.weights or "default"
    else:
        w = Path(opts.weights).stem
    parts = [data or "data", opts.model.replace("/", "_"), w]
    if opts.pool:
        parts.append(opts.pool)
    if opts.img_size:
        parts.append(str(opts.img_size))
    if opts.tta:
        if parse_tta(opts.tta):
            parts.append("tta-" + parse_tta(opts.tta).replace(",", "-"))
    return cache_dir / ("__".join(parts) + ".h5")


def options_for_identity(identity: dict[str, Any], *, weights: str | None = None,
                         what: str = "the head", **overrides: Any) -> ExtractOptions:
    """ExtractOptions that reproduce ``identity`` (a head's store identity: see
    provenance.options_for, whose OptionError it raises), with ``overrides`` (device,
    batch_size, workers, ...) for what does not change the features. ``runtime`` 'auto' in
    ``overrides`` keeps the runtime the identity needs (bf16: the one that made it)."""
    opts = options_for(identity, weights=weights, what=what)
    if overrides.get("runtime", "auto") == "auto":
        overrides.pop("runtime", None)
    return ExtractOptions(**{**opts, **overrides})
