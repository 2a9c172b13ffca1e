"""The `embedpipe` command line: parses options, calls the modules, prints results.

Heavy imports (torch, timm) happen inside the commands that need them, so `info` and `--help`
stay fast and torch-free.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

# What an interrupted command says (exit 130) when it did not say what it kept itself.
_INTERRUPTED_WHY = {
    "fit": " (nothing was written: a head file is written whole at the end)",
    "cv": " (nothing was written: the report is written whole at the end)",
    "compare": " (nothing was written: the report is written whole at the end)",
    "extract": " (extract continues where it stopped)",
    "quickstart": " (extract continues where it stopped)",
    "finetune": " (nothing was written yet)"}


def _interrupted_line(command: str | None) -> str:
    return "interrupted: rerun the same command" + _INTERRUPTED_WHY.get(command or "", "")


def _interrupted_while_importing(signum: int, frame: Any) -> None:
    """Ctrl-C while the `embedpipe` command imports its dependencies (h5py, scikit-learn...,
    about a second, before any command runs; a KeyboardInterrupt there ended in Python's
    traceback): nothing was done; the same line and exit status as a command interrupted
    later."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    sys.stderr.write(_interrupted_line(command) + "\n")
    sys.stderr.flush()
    os._exit(130)


# Only as the command (`embedpipe`, `python -m embedpipe[.cli]`), not when imported by a
# program, and only over Python's default handler (not a SIGINT ignored by `nohup`).
_AS_COMMAND = (__name__ == "__main__" or Path(sys.argv[0]).name in ("embedpipe", "__main__.py"))
if _AS_COMMAND and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_importing)

import typer  # noqa: E402 - after the handler above: Ctrl-C while importing is one line
from typer.core import TyperGroup

from . import DEFAULT_MODEL
from .data import DEFAULT_MAX_PIXELS
from .errors import Interrupted, InterruptedRun, UserError, first_line
from .evaluate import (DEFAULT_COMPARE_HEADS, DEFAULT_CV_HEADS, DEFAULT_FOLDS, DEFAULT_METRIC,
                       DEFAULT_REPEATS, DEFAULT_TOP_ERRORS)
from .extract.options import ExtractOptions
from .finetune.options import FinetuneOptions
from .heads import DEFAULT_HEAD
from .heads.stream import DEFAULT_CHUNK_ROWS

try:
    from typer._click.exceptions import UsageError
except ImportError:  # typer versions that use click itself
    from click.exceptions import UsageError  # type: ignore[no-redef]

_DEBUG = False  # `embedpipe --debug CMD`: let errors propagate with their traceback


def _exit(code: int) -> None:
    """Exit with ``code``; hard (os._exit, after flushing) when HDF5 could not close a store
    after a failed write: its exit handlers would print errors and may crash."""
    store = sys.modules.get(f"{__package__}.store")
    if store is not None and store.hdf5_broken():
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    raise typer.Exit(code)


class _OneLineErrors(TyperGroup):
    """Every failure of a command ends in one line on stderr and a non-zero exit: a UserError
    or a usage error (bad option, missing argument) exits 2 with the fix; anything else is a
    bug and exits 1 naming --debug, which shows the full traceback instead."""

    def make_context(self, info_name: Any, args: list[str], parent: Any = None,
                     **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as e:  # an unknown option before the command
            if "--debug" in args or type(e).__name__ == "NoArgsIsHelpError":
                raise
            typer.echo(f"error: {e.format_message()} (see `{info_name} --help`)", err=True)
            raise typer.Exit(2) from None

    def invoke(self, ctx: typer.Context) -> Any:
        global _DEBUG
        _DEBUG = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except (KeyboardInterrupt, Interrupted) as e:  # Ctrl-C outside extract's batch loop
            if _DEBUG or ctx.invoked_subcommand == "serve":  # Ctrl-C is how a server stops
                raise
            if isinstance(e, InterruptedRun):  # the command said what it kept
                typer.echo(str(e), err=True)
                _exit(130)
            typer.echo(_interrupted_line(ctx.invoked_subcommand), err=True)
            _exit(130)
        except UsageError as e:
            if _DEBUG:
                raise
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            _fail(f"{e.format_message()} (see `{where} --help`)")
        except UserError as e:
            if _DEBUG:
                raise
            _fail(e)
        except MemoryError:
            if _DEBUG:
                raise
            typer.echo("error: out of memory (MemoryError); for a store larger than memory "
                       "use a streaming head (fit/cv --head sgd or logreg-sgd) and a smaller "
                       "--chunk-rows, or run on a machine with more memory", err=True)
            _exit(1)
        except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
            if _DEBUG or (isinstance(e, OSError) and e.errno == errno.EPIPE):
                raise
            text = first_line(e, 200)
            typer.echo(f"error: unexpected {type(e).__name__}: {text} (a bug in embedpipe; "
                       "rerun with `embedpipe --debug ...` to see the traceback, and report "
                       "it)", err=True)
            _exit(1)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=_OneLineErrors,
                  help="Cache pretrained-backbone embeddings of image folders in HDF5; "
                       "train and evaluate classical heads on them.")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of "
                                        "any error (for bug reports) instead of one line.")
             ) -> None:
    """Cache pretrained-backbone embeddings of image folders in HDF5; train and evaluate
    classical heads on them."""


CACHE_DIR = Path("cache")  # the same as embedpipe.api.CACHE_DIR
FT = FinetuneOptions  # `finetune` takes its defaults from here

# -- options shared by several commands: declared once, defaults from the library ----------------

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Model = Annotated[str, typer.Option("--model", "-m", help="Any timm model name. Default: "
                                    "EfficientNet-Lite0 with the bundled offline ImageNet "
                                    "weights.")]
Weights = Annotated[Optional[str], typer.Option(
    "--weights", "-w", help="PATH to a .pth/.pt/.safetensors state dict or timm checkpoint; or "
    "'bundled' / 'hub'. Default: bundled when the model has them, else hub.")]
MovedWeights = Annotated[Optional[str], typer.Option(
    "--weights", "-w", help="The backbone weights file, if it moved since `fit`.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")]
Layout = Annotated[str, typer.Option(help="auto, class-folders, split-folders, unlabeled, "
                                          "manifest.")]
MaxPixels = Annotated[int, typer.Option(help="Skip images with more pixels than this "
                                             "(decompression-bomb guard).")]
Stores = Annotated[list[Path], typer.Argument(help="A feature store made by `embedpipe "
                                              "extract`; several stores of the same images "
                                              "(e.g. two backbones) are stacked side by side.")]
HeadParams = Annotated[Optional[list[str]], typer.Option(
    "--param", "-p", help="NAME=VALUE for every head that has NAME, or HEAD:NAME=VALUE; "
    "repeatable.")]
ClassWeight = Annotated[Optional[str], typer.Option(help="balanced: weight classes by inverse "
                                                         "frequency (heads that take it).")]
Seed = Annotated[int, typer.Option(help="Random seed (folds, SVM/MLP initialisation).")]
Folds = Annotated[int, typer.Option(help="Outer folds (lowered, with a warning, to the size of "
                                         "the smallest class).")]
Repeats = Annotated[int, typer.Option(help="Repeat the k-fold split this many times.")]
Search = Annotated[bool, typer.Option(help="Pick each head's grid parameters by stratified "
                                           "3-fold CV on its training rows only (nested inside "
                                           "each outer fold for cv/compare).")]
Metric = Annotated[str, typer.Option(help="Rank heads (and --search) by accuracy, "
                                          "balanced_accuracy or f1_macro.")]
CVJobs = Annotated[int, typer.Option(help="Parallel (head, fold) fits; -1: one per CPU core.")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Write the full report (JSON) "
                                                                "here.")]
Reject = Annotated[Optional[str], typer.Option(
    help="Label `unknown` the images the head should not decide: auto (the thresholds `fit "
         "--reject-rate` chose: low confidence or far from the training classes), a minimum "
         "confidence such as 0.5, or none. export: adds output `unknown` and label -1 there.")]
ChunkRows = Annotated[Optional[int], typer.Option(
    help="Streaming heads (sgd, logreg-sgd): rows read from the store at a time; bounds their "
         f"memory (default {DEFAULT_CHUNK_ROWS}).")]


def _fail(e: BaseException | str) -> None:
    typer.echo(f"error: {e}", err=True)
    _exit(2)


def _notice(line: str) -> None:
    """What a command says on stderr even with -q: facts the user did not choose explicitly,
    such as which entry of a finetune checkpoint the weights are (Backbone.notes)."""
    typer.echo(line, err=True)



RUNTIME_HELP = ("Inference runtime: auto, torch or openvino. auto: OpenVINO on the CPU where "
                "it is installed (`pip install 'embedpipe[openvino]'`) and runs the precision "
                "(f32, or bf16 on CPUs with native bf16), else torch (one line says why); "
                "torch on CUDA. The converted model is cached under "
                "~/.cache/embedpipe/openvino. fp32 features are the same either way; bf16 "
                "ones are not (a store records bf16-openvino and never mixes them).")


@app.command()
def extract(
    data: Path = typer.Argument(..., help="Image folder (class, split/class or unlabeled "
                                          "layout) or a CSV manifest (path,label[,split])."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Store to create or extend "
                                       "(default: cache/<data>__<model>__<weights>.h5)."),
    model: Model = DEFAULT_MODEL,
    weights: Weights = None,
    random_init: bool = typer.Option(False, "--random-init",
                                     help="Use random weights (recorded in the store)."),
    pool: Optional[str] = typer.Option(None, help="Global pool: avg, max, avgmax, catavgmax "
                                                  "(ViTs: token, avg, map)."),
    img_size: Optional[int] = typer.Option(None, help="Override the model's input size."),
    crop_pct: Optional[float] = typer.Option(None, help="Override the model's center-crop "
                                                        "fraction."),
    device: Device = ExtractOptions.device,
    precision: str = typer.Option(ExtractOptions.precision,
                                  help="auto, fp32, bf16 or fp16. auto: bf16 on CUDA "
                                               "(fp16 without bf16) and on CPUs with native "
                                               "bf16, else fp32; an existing store keeps its own."),
    dtype: str = typer.Option(ExtractOptions.dtype,
                              help="Stored feature dtype: float32 or float16."),
    batch_size: BatchSize = ExtractOptions.batch_size,
    workers: Optional[int] = typer.Option(None, help="Loader worker processes (default: cores "
                                                     "- 1, at least 1); with --engine ray: "
                                                     "backbone actors (default: one per "
                                                     "--num-gpus-per-worker share of the "
                                                     "cluster's GPUs, else 1)."),
    layout: Layout = ExtractOptions.layout,
    exact_decode: bool = typer.Option(False, help="Decode JPEGs at full size (default: "
                                                  "reduced-size decoding when the image is at "
                                                  "least twice the size the model needs)."),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    prune: bool = typer.Option(False, help="Remove rows of files that are gone from DATA or "
                                           "changed into something undecodable."),
    shard: Optional[str] = typer.Option(None, help="K/N: extract only shard K (0-based) of N, "
                                                   "for parallel workers; join with `merge`."),
    tta: Optional[str] = typer.Option(None, help="Test-time augmentation: store the mean "
                                                 "embedding over views: flip, crops (five "
                                                 "crops) or flip,crops. Part of the store's "
                                                 "provenance."),
    engine: str = typer.Option("in-process", help="in-process (default) or ray: decode as Ray "
                                                  "tasks and run the backbone on a pool of Ray "
                                                  "actors, writing shard stores under "
                                                  "STORE.shards/ merged into STORE (needs "
                                                  "`pip install 'embedpipe[ray]'`)."),
    address: Optional[str] = typer.Option(None, help="--engine ray: the Ray cluster (e.g. "
                                                     "HOST:6379, `auto`, or `local` for a new "
                                                     "local one). Default: RAY_ADDRESS or a "
                                                     "new local cluster."),
    num_gpus_per_worker: float = typer.Option(0.0, help="--engine ray: GPUs per backbone "
                                                        "actor (0: CPU actors)."),
    compile_: str = typer.Option(ExtractOptions.compile, "--compile",
                                help="torch.compile the backbone: auto, on or off. Compiled "
                                     "kernels are cached (~/.cache/embedpipe/inductor, or "
                                     "$TORCHINDUCTOR_CACHE_DIR); a failed compile warns once "
                                     "and continues eagerly. Not part of the store's identity "
                                     "(same features within float tolerance). auto: compile "
                                     "when enough images (x TTA views) are to be extracted for "
                                     "a cold compile to pay back (README: Performance). The "
                                     "torch runtime's: `on` with --runtime auto runs torch."),
    runtime: str = typer.Option(ExtractOptions.runtime, help=RUNTIME_HELP),
    quiet: Quiet = False,
) -> None:
    """Extract pooled features of every image under DATA into an HDF5 store (resumable)."""
    from .api import run_extract
    from .extract.options import default_store_path

    opts = ExtractOptions(model=model, weights=weights, random_init=random_init, pool=pool,
                          img_size=img_size, crop_pct=crop_pct, device=device,
                          precision=precision, dtype=dtype, batch_size=batch_size,
                          workers=workers, layout=layout, exact_decode=exact_decode,
                          max_pixels=max_pixels, prune=prune, shard=shard, tta=tta,
                          compile=compile_, runtime=runtime)
    store = out or default_store_path(data, opts, CACHE_DIR)
    summary = run_extract(data, store, opts, engine=engine, address=address, workers=workers,
                          gpus_per_worker=num_gpus_per_worker, progress=not quiet,
                          notice=_notice)
    skipped = summary.failures + summary.ignored_files
    for path, reason in skipped[:20]:
        typer.echo(f"skipped {path}: {reason}", err=True)
    if len(skipped) > 20:
        typer.echo(f"... and {len(skipped) - 20} more (see `embedpipe info {store}`)", err=True)
    if summary.stale and not summary.pruned:
        typer.echo(f"{len(summary.stale)} files changed and no longer decode; their rows still "
                   "hold the old features (rerun with --prune to remove them)", err=True)
    if summary.all_vanished:  # never advise --prune: it would delete every stored row
        typer.echo(f"note: none of the {len(summary.vanished)} stored files is in {data} (e.g. "
                   f"{summary.vanished[0]}): {data} looks like another dataset, or the images "
                   "moved; their rows are kept (pass the folder they are in now to update "
                   "them)", err=True)
    elif summary.vanished and not summary.pruned:
        shown = ", ".join(summary.vanished[:5])
        more = f" and {len(summary.vanished) - 5} more" if len(summary.vanished) > 5 else ""
        typer.echo(f"{len(summary.vanished)} stored files are gone from {data}: {shown}{more} "
                   "(rerun with --prune to remove them)", err=True)
    typer.echo(summary.line())
    if summary.interrupted:
        typer.echo("interrupted: every finished batch is in the store; rerun the same command "
                   "to continue", err=True)
        raise typer.Exit(130)


@app.command()
def info(
    store: Path = typer.Argument(..., help="An HDF5 store made by `embedpipe extract`."),
    as_json: AsJson = False,
    show: int = typer.Option(50, help="List at most this many skipped files."),
) -> None:
    """Show what a store holds: size, classes, splits, backbone, preprocessing, skipped files."""
    from .store.report import describe, format_info

    report = describe(store)
    typer.echo(json.dumps(report, indent=2) if as_json else format_info(report, show=show))


@app.command()
def merge(
    stores: list[Path] = typer.Argument(..., help="Stores made with the same model, weights, "
                                                  "preprocessing, precision and TTA (e.g. "
                                                  "shards). Without -o the first is the store "
                                                  "to create or extend."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Store to create or extend "
                                       "(rows already in it are kept)."),
    on_conflict: str = typer.Option("error", "--on-conflict", help="A path holding different "
                                    "images in two stores: error (refuse, the default), "
                                    "first (keep the first row; the dropped ones are recorded "
                                    "and listed by `info`), qualify (store every row as "
                                    "<store name>/<path>)."),
) -> None:
    """Merge stores of one backbone (e.g. `extract --shard K/N` outputs) into one store:
    `merge SHARD... -o STORE` (or `merge STORE SHARD...`). Stores with other provenance are
    refused; a path in several stores with the same image is kept once; a path holding
    different images is refused unless --on-conflict says otherwise."""
    from .env import EXTRACT, versions
    from .store.ops import merge as merge_stores

    if out is None:
        if len(stores) < 2:
            _fail("Missing argument: the stores to merge; pass SHARD... -o STORE (or STORE "
                  "SHARD...) (see `embedpipe merge --help`)")
        out, stores = stores[0], stores[1:]
    counts = merge_stores(out, stores, versions=versions(*EXTRACT), on_conflict=on_conflict,
                          progress=lambda m: typer.echo(m, err=True))
    conflicts = counts["conflicts"]
    if conflicts:
        typer.echo(f"{len(conflicts)} paths are in several stores with different content "
                   f"(e.g. {conflicts[0]}); kept the first row of each (the target's own, then "
                   "argument order); the dropped rows are recorded: `embedpipe info "
                   f"{out}` lists them", err=True)
    if counts.get("qualified"):
        typer.echo("paths qualified by store: " + ", ".join(
            f"{p} → {q}/" for p, q in counts["qualified"].items()), err=True)
    if counts.get("twice"):
        typer.echo(f"note: {counts['twice']} rows added are images another of the stores "
                   f"already holds under another path (e.g. {counts['twice_example']}), so "
                   "each is kept once per path: cross-validation can put a copy and its "
                   "original in different folds (`embedpipe audit` lists them as exact "
                   "duplicates)", err=True)
    typer.echo(f"merged {len(stores)} stores into {out}: {counts['added']} rows added, "
               f"{counts['skipped']} already there, {len(conflicts)} conflicting duplicates "
               f"dropped, {counts['errors']} skipped-file records")


@app.command()
def models(
    as_json: AsJson = False,
) -> None:
    """List backbones usable offline here (bundled weights, hub cache) with feature dims."""
    from .backbones import available_models, offline_feature_dim

    rows = available_models()
    for r in rows:
        r["feature_dim"] = offline_feature_dim(r["model"])
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'model':<28} {'dim':>5}  {'status':<13} source")
    for r in rows:
        status = "available" if r["installed"] else "not installed"
        typer.echo(f"{r['model']:<28} {r['feature_dim'] or '?':>5}  {status:<13} {r['source']}")
    typer.echo("Any other timm model works with --weights PATH (or from the hub when reachable).")


@app.command()
def heads(
    as_json: AsJson = False,
) -> None:
    """List the classification heads with their preprocessing, defaults and search grids."""
    from .heads.registry import PREP_CHOICES, describe, without_sqrt

    rows = describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=list))
        return
    for r in rows:
        typer.echo(f"{r['head']:<11} {r['summary']}")
        pre = ", ".join(r["preprocessing"]) or "none"
        typer.echo(f"{'':<11} preprocessing: {pre}; then optional PCA (--param pca=N)")
        defaults = ", ".join(f"{k}={v}" for k, v in r["defaults"].items()) or "scikit-learn's"
        typer.echo(f"{'':<11} defaults: {defaults}")
        grid = "; ".join(f"{k} in {v}" for k, v in r["grid"].items())
        typer.echo(f"{'':<11} search grid: {grid}")
        for last, g in r["prep_grid"].items():
            preps = " or ".join(f"prep={p}" for p, steps in PREP_CHOICES.items()
                                if steps and steps[-1] == last)
            typer.echo(f"{'':<11} search grid with {preps}: "
                       + "; ".join(f"{k} in {v}" for k, v in g.items()))
        typer.echo(f"{'':<11} class weights: {'yes' if r['class_weight'] else 'no'}; "
                   f"probabilities: {r['probabilities']}"
                   + ("; streamed from the store in --chunk-rows chunks, max_iter = epochs"
                      if r["streaming"] else ""))
        for rule in r["data_rules"]:
            prep = rule["params"].get("prep")
            if prep:  # the same rows but for the square root keep the rule (_over_rule)
                other = (without_sqrt(prep) if prep.startswith("sqrt") else
                         "sqrt" if prep == "none" else f"sqrt+{prep}")
            typer.echo(f"{'':<11} data rule: {rule['rule']}" + (
                f" (without --param prep or with prep={prep} or {other}; with another prep "
                "the defaults above apply)"
                if prep else ""))
    from .heads.auto import DEFAULT_BUDGET
    from .heads.registry import AUTO

    typer.echo(f"{'auto':<11} {AUTO.summary} (default head of fit; --budget, default "
               f"{DEFAULT_BUDGET:g} s; the candidates and the choice go into the head's manifest)")
    typer.echo("Override with --param NAME=VALUE (e.g. --param C=10 --param pca=128).")
    typer.echo("Ensembles: join heads with + (--head svm+logreg+knn, or fit --head svm --head "
               "logreg --ensemble soft):\nsoft voting over their probabilities, members with "
               "their defaults for the data (their data rules, as alone); --param "
               "MEMBER:NAME=VALUE sets one member's (e.g. logreg:C=0.1, knn:weights=uniform), "
               "NAME=VALUE every member that has NAME (pca, weights and voting are the vote's "
               "own).")


def _head_name(names: list[str], ensemble: str | None) -> str:
    from .heads.registry import ENSEMBLE_SEP, HeadError

    if ensemble not in (None, "soft"):
        raise HeadError(f"--ensemble {ensemble}: pass soft (soft voting over probabilities)")
    if len(names) > 1 and ensemble is None:
        raise HeadError(f"--head {' --head '.join(names)}: fit trains one head; add --ensemble "
                        "soft to combine them, or pass a single --head")
    return ENSEMBLE_SEP.join(names)


def _budget(text: str, name: str) -> float:
    from .heads.auto import AUTO, check_budget
    from .heads.registry import HeadError

    if AUTO not in name.split("+"):
        raise HeadError(f"--budget {text}: only --head auto takes a budget; drop it or pass "
                        "--head auto")
    return check_budget(text)


@app.command()
def fit(
    store: Stores,
    head: Optional[list[str]] = typer.Option(None, "--head", help="Head to train (default "
                                             f"{DEFAULT_HEAD}: chosen by cross-validation; see "
                                             "`embedpipe heads`); several with --ensemble soft."),
    budget: Optional[str] = typer.Option(None, help="--head auto: seconds it may spend "
                                         "choosing (default 120; the final fit of the "
                                         "choice on all rows comes after)."),
    ensemble: Optional[str] = typer.Option(None, help="soft: one soft-voting ensemble of the "
                                                      "--head heads (same as --head a+b+c)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Head file to write "
                                       "(default: cache/<store>__<head>.skops)."),
    param: HeadParams = None,
    class_weight: ClassWeight = None,
    search: Search = False,
    seed: Seed = 0,
    jobs: Optional[int] = typer.Option(None, help="Parallel jobs for --search."),
    chunk_rows: ChunkRows = None,
    reject_rate: Optional[float] = typer.Option(None, help="Choose `predict --reject auto`'s "
                                                "thresholds for this false-reject rate (e.g. "
                                                "0.05) on out-of-fold rows (5 more fits)."),
    quiet: Quiet = False,
) -> None:
    """Train a head on a store's train split (or all labeled rows) and write a head file.

    `fit A.h5 B.h5` trains on the features of both stores side by side, row by row matched by
    image path; `predict HEAD --store A.h5 --store B.h5` (or images) uses both backbones."""
    from .heads import registry as heads_mod
    from .heads import train

    params = heads_mod.parse_params(param)
    name = _head_name(head or [DEFAULT_HEAD], ensemble)
    if budget is not None:
        params["budget"] = _budget(budget, name)
    dest = out or train.default_head_path(store, name, CACHE_DIR)
    result = train.fit(store, name, dest, params=params, class_weight=class_weight,
                  search=search, seed=seed, jobs=jobs, chunk_rows=chunk_rows,
                  reject_rate=reject_rate, progress=not quiet,
                  say=(lambda m: None) if quiet else (lambda m: typer.echo(m, err=True)))
    if result.finetuned:  # the backbone was tuned on these rows: said even with -q
        typer.echo(result.finetuned, err=True)
    typer.echo(result.line())


def _given(ctx: typer.Context, *names: str) -> list[str]:
    """The flags (--name) of those ``names`` that the command line (or the environment) set,
    rather than left at their defaults."""
    given = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.append("--" + name.replace("_", "-"))
    return given


# predict's options that only mean something for one of its two inputs
PREDICT_STORE_ONLY = ("split", "chunk_rows")
PREDICT_IMAGES_ONLY = ("weights", "keep_store", "device", "batch_size", "workers", "runtime")


@app.command()
def predict(
    ctx: typer.Context,
    head: Path = typer.Argument(..., help="A head file made by `embedpipe fit`."),
    images: Optional[list[Path]] = typer.Argument(None, help="Image files, folders or CSV "
                                                  "manifests to classify end to end."),
    store: Optional[list[Path]] = typer.Option(None, "--store", "-s", help="Classify the rows "
                                               "of this feature store instead (no torch "
                                               "needed); repeat it for a head fitted on "
                                               "stacked stores."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="CSV to write (default: "
                                       "standard output)."),
    top_k: int = typer.Option(3, help="How many top classes (with probabilities) per image."),
    split: Optional[str] = typer.Option(None, help="With --store: only rows of this split."),
    weights: MovedWeights = None,
    keep_store: Optional[Path] = typer.Option(None, help="Images: keep their features in this "
                                              "store (reruns skip what is there)."),
    device: Device = ExtractOptions.device,
    batch_size: BatchSize = ExtractOptions.batch_size,
    workers: Optional[int] = typer.Option(None, help="Images: loader worker processes."),
    runtime: str = typer.Option(ExtractOptions.runtime, help="Images: auto, torch or "
                                "openvino. auto: the runtime that made the head's features "
                                "where it matters (bf16), else as `extract --runtime auto`."),
    chunk_rows: int = typer.Option(DEFAULT_CHUNK_ROWS, help="With --store: rows classified at "
                                   "a time (bounds memory; the CSV is written chunk by chunk)."),
    reject: Reject = None,
    quiet: Quiet = False,
) -> None:
    """Classify a store's rows (torch-free) or images end to end; write a CSV of predictions."""
    if (not store) == (not images):
        _fail(UserError("pass either IMAGES... or --store STORE (not both, not neither), e.g. "
                        f"`embedpipe predict {head} photos/` or `--store cache/x.h5`"))
    if top_k < 1:
        _fail(UserError(f"--top-k {top_k}: pass 1 or more"))
    moot = _given(ctx, *(PREDICT_IMAGES_ONLY if store else PREDICT_STORE_ONLY))
    if moot:
        _fail(UserError(
            f"{moot[0]} only applies when classifying images (predict HEAD IMAGES...), not "
            f"--store rows, whose features are already computed: leave {moot[0]} out"
            if store else
            f"{moot[0]} only applies to --store rows, not to IMAGES...: leave {moot[0]} out "
            "(or classify a store's rows with --store STORE)"))
    from . import predict as pr

    if store:  # streamed: each chunk's rows are written as they are done
        preds = pr.to_csv(head, store, out, top_k=top_k, split=split,
                     chunk_rows=chunk_rows, progress=not quiet, reject=reject)
    else:
        preds = pr.from_images(head, images, top_k=top_k, weights=weights, device=device,
                               batch_size=batch_size, workers=workers, keep_store=keep_store,
                               progress=not quiet, runtime=runtime, out=out, reject=reject,
                               notice=_notice)
    for path, reason in preds.skipped[:20]:
        typer.echo(f"skipped {path}: {reason}", err=True)
    for note in preds.notes:
        typer.echo(note, err=True)
    if not store:
        preds.write_csv(out, top_k)
    typer.echo(preds.line() + (f" → {out}" if out and str(out) != "-" else ""), err=out is None)


def _call(command: Callable[..., Any], **given: Any) -> Any:
    """Call another command's function in-process: ``given`` arguments, every other parameter
    its command-line default (typer keeps those in OptionInfo/ArgumentInfo objects)."""
    import inspect

    kwargs = {}
    for name, param in inspect.signature(command).parameters.items():
        if name in given:
            kwargs[name] = given[name]
        else:
            default = param.default
            kwargs[name] = getattr(default, "default", default)
    return command(**kwargs)


@app.command()
def quickstart(
    folder: Path = typer.Option(CACHE_DIR / "quickstart" / "fashion-mnist",
                                help="Where to write the demo images."),
    per_class: int = typer.Option(12, help="Training images per class."),
    test_per_class: int = typer.Option(4, help="Held-out test images per class."),
    out: Path = typer.Option(CACHE_DIR / "quickstart.h5", "--out", "-o"),
) -> None:
    """Offline demo of the whole pipeline on real Fashion-MNIST images: extract with the
    bundled backbone → cv of three heads → fit `--head auto` (on this few images the soft vote
    of every head's defaults, the cv table next to it) → predict the test images end to end."""
    from . import predict as pr
    from .datasets import write_fashion_mnist_folder
    from .evaluate import cv as ev_cv
    from .evaluate import report as ev_report
    from .heads import train

    if per_class < 2 or test_per_class < 1:
        _fail(UserError("--per-class must be at least 2 and --test-per-class at least 1"))
    write_fashion_mnist_folder(folder,
         splits={"train": per_class, "test": test_per_class})
    typer.echo(f"1/4 wrote {10 * (per_class + test_per_class)} Fashion-MNIST images to {folder} "
               f"(train/: {per_class} per class, test/: {test_per_class} per class)")
    typer.echo(f"2/4 embedpipe extract {folder} -o {out}")
    _call(extract, data=folder, out=out)
    _call(info, store=out)
    typer.echo(f"\n3/4 embedpipe cv {out} --head logreg --head knn --head centroid")
    report = ev_cv.run_cv(out, ["logreg", "knn", "centroid"], folds=5, top_errors=3,
                  progress=False, warn=lambda m: typer.echo(m, err=True))
    typer.echo(ev_report.format_report(report))
    head_file = out.with_name(f"{out.stem}__{DEFAULT_HEAD}.skops")
    typer.echo(f"\n4/4 embedpipe fit {out} -o {head_file} (--head {DEFAULT_HEAD}: it scores "
               "every head by cv and, on a few hundred rows, fits the soft vote of their "
               f"defaults); then embedpipe predict {head_file} {folder / 'test'}")
    typer.echo(train.fit(out, DEFAULT_HEAD, head_file,
                         say=lambda m: typer.echo(m) if m.startswith(("  ", "auto chose"))
                         else None).line())
    preds = pr.from_images(head_file, [folder / "test"], progress=False)
    csv_path = out.with_name(f"{out.stem}__predictions.csv")
    preds.write_csv(csv_path, 3)
    for line in csv_path.read_text().splitlines()[:6]:
        typer.echo("  " + line)
    typer.echo(preds.line() + f" → {csv_path}")


@app.command()
def cv(
    store: Stores,
    head: Optional[list[str]] = typer.Option(None, "--head", help="Head to evaluate, "
                                             "repeatable (default: "
                                             f"{' '.join(DEFAULT_CV_HEADS)}; see `embedpipe "
                                             "heads`)."),
    budget: Optional[str] = typer.Option(None, help="--head auto: seconds each choice may "
                                         "spend (default 120; one choice per outer fold)."),
    folds: Folds = DEFAULT_FOLDS,
    repeats: Repeats = DEFAULT_REPEATS,
    search: Search = False,
    metric: Metric = DEFAULT_METRIC,
    param: HeadParams = None,
    class_weight: ClassWeight = None,
    jobs: CVJobs = 1,
    seed: Seed = 0,
    json_out: JsonOut = None,
    plots: Optional[Path] = typer.Option(None, help="Write confusion_matrix.png and "
                                                    "scores.png into this folder (needs "
                                                    "matplotlib)."),
    top_errors: int = typer.Option(DEFAULT_TOP_ERRORS, help="List this many most confidently "
                                   "misclassified files of the best head."),
    ensemble: Optional[str] = typer.Option(None, help="soft: also score the soft-voting "
                                                      "ensemble of the --head heads."),
    chunk_rows: ChunkRows = None,
    quiet: Quiet = False,
) -> None:
    """Cross-validate heads on a store's train rows (stratified k-fold), rank them, and score
    the best one on the held-out splits.

    Folds are computed once on the train rows in store order and shared by all heads:
    StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=SEED), or with --repeats R > 1
    RepeatedStratifiedKFold(n_splits=FOLDS, n_repeats=R, random_state=SEED).
    """
    from .evaluate import cv as ev_cv
    from .evaluate import report as ev_report

    ev_report.check_outputs(json_out, plots, store)
    if budget is not None:
        param = [*(param or []), f"auto:budget={_budget(budget, '+'.join(head or []))}"]
    if ensemble is not None:
        head = list(head or DEFAULT_CV_HEADS)
        head.append(_head_name(head, ensemble))
    report = ev_cv.run_cv(store, head, folds=folds, repeats=repeats, search=search,
                  metric=metric, params=param, class_weight=class_weight, jobs=jobs, seed=seed,
                  top_errors=top_errors, progress=not quiet, chunk_rows=chunk_rows,
                  warn=lambda m: typer.echo(m, err=True))
    typer.echo(ev_report.format_report(report))
    if json_out is not None:
        ev_report.write_report(report, json_out)
        typer.echo(f"report → {json_out}", err=True)
    if plots is not None:
        written = ev_report.write_plots(report, plots)
        typer.echo("plots → " + ", ".join(str(p) for p in written), err=True)


@app.command()
def compare(
    stores: list[Path] = typer.Argument(..., help="Two or more stores of the same labeled "
                                        "images (other backbones, weights or precisions)."),
    head: Optional[list[str]] = typer.Option(None, "--head", help="Head to evaluate, "
                                             "repeatable (default: "
                                             f"{' '.join(DEFAULT_COMPARE_HEADS)})."),
    folds: Folds = DEFAULT_FOLDS,
    repeats: Repeats = DEFAULT_REPEATS,
    search: Search = False,
    metric: Metric = DEFAULT_METRIC,
    param: HeadParams = None,
    class_weight: ClassWeight = None,
    jobs: CVJobs = 1,
    seed: Seed = 0,
    json_out: JsonOut = None,
    chunk_rows: ChunkRows = None,
    quiet: Quiet = False,
) -> None:
    """Cross-validate the same heads on the same folds over several stores of the same images
    and print one table (with the paired per-fold difference for two stores)."""
    from .evaluate import cv as ev_cv
    from .evaluate import report as ev_report

    ev_report.check_outputs(json_out, None, stores)
    report = ev_cv.run_compare(stores, head, folds=folds, repeats=repeats, search=search,
                  metric=metric, params=param, class_weight=class_weight, jobs=jobs, seed=seed,
                  progress=not quiet, chunk_rows=chunk_rows,
                  warn=lambda m: typer.echo(m, err=True))
    typer.echo(ev_report.format_compare(report))
    if json_out is not None:
        ev_report.write_report(report, json_out)
        typer.echo(f"report → {json_out}", err=True)


@app.command()
def finetune(
    data: Path = typer.Argument(..., help="Labeled images: class folders, split folders "
                                          "(train/ and val/ are used; test/ is left out) or a "
                                          "CSV manifest (path,label[,split])."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Tuned backbone weights to "
                                       "write (.pt; default cache/<data>__<model>__tuned.pt). "
                                       "Beside it: <stem>.json (manifest), .history.json, "
                                       ".classifier.pt, .curves.png, .checkpoints/."),
    model: Model = FT.model,
    weights: Weights = FT.weights,
    epochs: int = typer.Option(FT.epochs, help="Total epochs, head-only ones included."),
    head_epochs: int = typer.Option(FT.head_epochs, help="Stage 1: epochs that train only the new "
                                            "classifier, backbone frozen."),
    unfreeze: int = typer.Option(FT.unfreeze, help="Stage 2: train the last N feature stages (e.g. "
                                         "EfficientNet blocks[-N:] + conv_head/bn2, ResNet "
                                         "layer4...); 0: classifier only."),
    gradual: bool = typer.Option(FT.gradual, help="Stage 2 unfreezes one more stage, deep to "
                                             "shallow, every --stage-epochs epochs, up to "
                                             "--unfreeze."),
    stage_epochs: int = typer.Option(FT.stage_epochs,
                                     help="With --gradual: epochs per unfreezing step."),
    img_size: Optional[int] = typer.Option(FT.img_size, help="Input size (smaller is faster on a "
                                                      "CPU); default: the model's own."),
    batch_size: BatchSize = FT.batch_size,
    lr: float = typer.Option(FT.lr, help="Learning rate of the pretrained layers."),
    head_lr: float = typer.Option(FT.head_lr, help="Learning rate of the new classifier."),
    weight_decay: float = typer.Option(FT.weight_decay,
                                       help="AdamW weight decay (not on biases/norms)."),
    warmup_epochs: float = typer.Option(FT.warmup_epochs,
                                        help="Linear warmup at the start of each stage "
                                                  "(at most half of it), then cosine decay."),
    label_smoothing: float = typer.Option(FT.label_smoothing,
                                          help="Label smoothing of the training loss."),
    dropout: float = typer.Option(FT.dropout, help="Dropout before the classifier."),
    bn_frozen: bool = typer.Option(FT.bn_frozen, "--bn-frozen/--bn-train",
                                   help="BatchNorm layers keep the pretrained running "
                                        "statistics (eval mode) while their scale and shift "
                                        "train; --bn-train updates them from the batches."),
    ema: float = typer.Option(FT.ema, help="Decay of an exponential moving average of the "
                                            "weights, validated beside them every epoch; the "
                                            "better one is kept (0: none)."),
    randaugment: bool = typer.Option(FT.randaugment,
                                     help="timm RandAugment (rand-m9-mstd0.5) instead "
                                                 "of colour jitter."),
    cutmix: bool = typer.Option(FT.cutmix, help="timm CutMix on training batches."),
    hflip: bool = typer.Option(FT.hflip, help="Random horizontal flips (--no-hflip for text, "
                                          "digits, ...)."),
    val_fraction: float = typer.Option(FT.val_fraction,
                                       help="Without a val/ split: stratified fraction "
                                                 "held out for validation (0: none; then "
                                                 "nothing can choose, so the EMA weights are "
                                                 "kept when --ema > 0, else the last epoch)."),
    patience: int = typer.Option(FT.patience, help="Stop when stage-2 validation accuracy has not "
                                         "improved for this many epochs (0: never)."),
    keep: str = typer.Option(FT.keep, help="The output: best (the epoch with the best "
                                           "validation accuracy, then loss) or last (the end "
                                           "of the schedule; validation still picks EMA or "
                                           "trained weights)."),
    class_weight: Optional[str] = typer.Option(FT.class_weight, help="balanced: weight the loss by "
                                                          "inverse class frequency."),
    seed: int = typer.Option(FT.seed, help="Seeds the split, the classifier, augmentation and "
                                     "shuffling."),
    device: Device = FT.device,
    precision: str = typer.Option(FT.precision, help="auto (CUDA: bf16 AMP, fp16 AMP without bf16; "
                                               "CPU: fp32), fp32, bf16 or fp16."),
    workers: Optional[int] = typer.Option(FT.workers, help="Loader worker processes (default: "
                                                     "cores - 1)."),
    threads: Optional[int] = typer.Option(FT.threads, help="torch intra-op threads (default: "
                                                     "torch's; 1 is often faster on a busy "
                                                     "machine)."),
    deterministic: Optional[bool] = typer.Option(FT.deterministic,
                                                 "--deterministic/--no-deterministic",
                                                 help="Deterministic algorithms (default: on "
                                                      "for the CPU, off for CUDA)."),
    layout: str = typer.Option(FT.layout, help="auto, class-folders, split-folders, manifest."),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    keep_checkpoints: int = typer.Option(FT.keep_checkpoints,
                                         help="Keep the last N epoch checkpoints (0: all)."),
    budget: Optional[float] = typer.Option(FT.budget, help="CPU seconds the run may use "
                                           "(user + system, loader workers included); checked "
                                           "between epochs: the epoch --keep chooses so far "
                                           "is the output, --resume continues. Default: no "
                                           "cap."),
    resume: Optional[Path] = typer.Option(None, help="Continue from a checkpoint file (or the "
                                                     "checkpoint folder: its latest); pass the "
                                                     "same DATA and options."),
    overwrite: bool = typer.Option(False, help="Replace the outputs of an earlier run."),
    quiet: Quiet = False,
) -> None:
    """Fine-tune a pretrained backbone on DATA (new classifier; frozen, then partly unfrozen
    backbone) and write weights that `extract --weights` uses directly."""
    from .finetune import loop as ft_loop

    given = locals()
    opts = FinetuneOptions(**{f.name: given[f.name] for f in dataclasses.fields(FinetuneOptions)})
    dest = out or CACHE_DIR / f"{data.resolve().name}__{model.replace('/', '_')}__tuned.pt"
    result = ft_loop.finetune(data, dest, opts, resume=resume, overwrite=overwrite,
                  progress=not quiet, notice=_notice)
    typer.echo(result.line())
    if not quiet:
        typer.echo(result.extract_hint(data), err=True)


@app.command()
def similar(
    store: Path = typer.Argument(..., help="A feature store made by `embedpipe extract`."),
    queries: list[str] = typer.Argument(..., help="Paths stored in STORE (their stored "
                                        "features; no torch needed) and/or new image files, "
                                        "folders or CSV manifests (embedded with the store's "
                                        "backbone)."),
    k: int = typer.Option(10, "-k", "--top-k", help="Neighbours per query."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File to write (default: "
                                       "standard output)."),
    index: str = typer.Option("auto", help="auto (exact up to 50000 rows, then an HNSW "
                              "index if faiss is installed), exact, or hnsw."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="New images: the "
                                          "backbone weights file, if it moved since extract."),
    device: Device = ExtractOptions.device,
    batch_size: BatchSize = ExtractOptions.batch_size,
    workers: Optional[int] = typer.Option(None, help="New images: loader worker processes."),
    quiet: Quiet = False,
) -> None:
    """Nearest stored images (cosine similarity of the features) of stored paths or new
    images; exact search, or a cached HNSW index above 50000 rows."""
    from . import similar as sim

    if fmt not in sim.FORMATS:
        _fail(UserError(f"--format {fmt}: pass one of {', '.join(sim.FORMATS)}"))
    say = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    res = sim.search(store, queries, k=k, out=out, method=index, weights=weights,
                     device=device,
                     batch_size=batch_size, workers=workers, progress=not quiet, say=say,
                     notice=_notice)
    for path, reason in res.skipped[:20]:
        typer.echo(f"skipped {path}: {reason}", err=True)
    for note in res.notes:
        typer.echo(note, err=True)
    sim.write(res, fmt, out)
    if out is not None and str(out) != "-":
        typer.echo(f"{len(res.queries)} queries, {k} neighbours each ({res.method}) → {out}")


@app.command("export-features")
def export_features(
    store: Path = typer.Argument(..., help="A feature store."),
    out: Path = typer.Option(..., "--out", "-o", help="x.parquet (pyarrow), x.npz or x.npy: "
                             "columns path, label, split, hash, features; a fine-tuned "
                             "backbone's record in .parquet and .npz."),
    chunk_rows: int = typer.Option(8192, help="Rows read and written at a time."),
    quiet: Quiet = False,
) -> None:
    """Write a store's rows (path, label, split, hash, features) to Parquet, .npz or .npy,
    and the record of the images a fine-tuned backbone was trained on (.parquet, .npz)."""
    from . import features_io as fio

    # a record .npy cannot hold is said even with -q: the imported store will lack it
    n = fio.export_features(store, out, chunk_rows=chunk_rows, progress=not quiet,
                            notice=lambda m: typer.echo(m, err=True))
    typer.echo(f"exported {n} rows of {store} → {out}")


@app.command("import-features")
def import_features(
    file: Path = typer.Argument(..., help="A .parquet, .npz or .npy with columns path, label "
                                "(class name; empty: unlabeled), features (D floats per row) "
                                "and optionally split and hash (the image's sha256); a "
                                "fine-tuned backbone's record (export-features) is kept."),
    out: Path = typer.Option(..., "--out", "-o", help="The new store to write."),
    model_name: Optional[str] = typer.Option(None, help="What made the features, for the "
                                             "record (default: the file's stem); the store's "
                                             "model is imported:NAME."),
    quiet: Quiet = False,
) -> None:
    """Make a store of precomputed embeddings (provenance imported:<file sha256>), so fit,
    cv, compare, predict --store, similar and audit work on them."""
    from . import features_io as fio

    n, classes, dim = fio.import_features(
        file, out, model_name=model_name, progress=not quiet,
        say=(lambda m: None) if quiet else (lambda m: typer.echo(m, err=True)))
    typer.echo(f"imported {n} rows ({classes} classes, {dim}-d) from {file} → {out}")


@app.command()
def serve(
    head: Path = typer.Argument(..., help="A head file made by `embedpipe fit`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (default: loopback "
                             "only; 0.0.0.0 exposes the API to the network)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port, printed at start-up)."),
    max_batch: int = typer.Option(32, help="Most images per backbone forward pass."),
    batch_wait_ms: float = typer.Option(10.0, help="After the first image of a batch, wait "
                                        "this long for more to arrive together."),
    max_upload_mb: float = typer.Option(20.0, help="Request body limit in MB (413 above)."),
    max_pixels: Optional[int] = typer.Option(None, help="Refuse images with more pixels "
                                             "(413); default 40000000."),
    device: Device = "auto",
    top_k: int = typer.Option(3, help="Top classes per image (override per request with "
                              "?top_k=N)."),
    weights: MovedWeights = None,
    runtime: str = typer.Option(ExtractOptions.runtime, help="auto, torch or openvino (as "
                                "`predict HEAD IMAGES --runtime`)."),
    reject: Reject = None,
) -> None:
    """Serve a head over HTTP: POST /predict (multipart images), GET /health, GET /info."""
    from . import serve as sv

    settings = sv.Settings(max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                           max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                           max_pixels=sv.DEFAULT_MAX_PIXELS if max_pixels is None
                           else max_pixels, top_k=top_k, reject=reject)
    sv.serve(head, host=host, port=port, settings=settings, weights=weights,
             device=device, runtime=runtime, say=lambda m: typer.echo(m, err=True))


@app.command()
def export(
    head: Path = typer.Argument(..., help="A head file made by `embedpipe fit`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="ONNX file to write "
                                       "(default: HEAD with .onnx, or .int8.onnx with "
                                       "--int8); the sidecar <out>.json goes beside it."),
    int8: bool = typer.Option(False, "--int8", help="Quantize the backbone to int8 "
                              "(onnxruntime.quantization; the head stays fp32)."),
    int8_mode: Optional[str] = typer.Option(None, help="With --int8: static (calibrated on "
                                            "images; the default) or dynamic (no "
                                            "calibration, less accurate on conv nets)."),
    calib: Optional[list[Path]] = typer.Option(None, "--calib", help="With --int8 static: "
                                               "calibration images (files, folders or a "
                                               "store's .h5; default: the head's training "
                                               "images)."),
    calib_count: Optional[int] = typer.Option(None, help="With --int8 static: how many "
                                              "calibration images to use (default 64)."),
    opset: int = typer.Option(17, help="ONNX opset (13-20)."),
    weights: MovedWeights = None,
    reject: Reject = None,
    quiet: Quiet = False,
) -> None:
    """Export backbone + head as one ONNX graph: input `image` (N x 3 x H x W float RGB in
    [0,1], resized and centre-cropped as the sidecar says; mean/std inside), outputs
    `probabilities` (N x C) and `label` (class index); class names in <out>.json."""
    from . import export as ex

    dest = out or head.with_suffix(".int8.onnx" if int8 else ".onnx")
    res = ex.export(head, dest, int8=int8, int8_mode=int8_mode, calib=calib,
               calib_count=calib_count, opset=opset, weights=weights, reject=reject,
               say=None if quiet else (lambda m: typer.echo(m, err=True)), notice=_notice)
    typer.echo(res.line())


@app.command()
def audit(
    store: Path = typer.Argument(..., help="A feature store made by `embedpipe extract`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for report.html, "
                                       "audit.json (and fix_plan.csv); default: "
                                       "<store>-audit/ beside the store."),
    fix_plan: bool = typer.Option(False, "--fix-plan", help="Also write fix_plan.csv: "
                                  "suggested actions (drop-duplicate, review-label, "
                                  "review-outlier) to review and edit; nothing is changed."),
    threshold: Optional[float] = typer.Option(None, help="Cosine similarity at or above which "
                                              "two images are near duplicates (default 0.94, "
                                              "measured: see README)."),
    k: int = typer.Option(5, "-k", help="Neighbours of the kNN outlier distance."),
    folds: int = typer.Option(5, help="Cross-validation folds for the out-of-fold "
                              "probabilities behind label errors."),
    head: str = typer.Option("logreg", help="Head giving the out-of-fold probabilities."),
    images: Optional[Path] = typer.Option(None, help="The image folder, if it moved since "
                                          "extraction (thumbnails only)."),
    no_map: bool = typer.Option(False, "--no-map", help="Skip the 2-D embedding map."),
    seed: int = typer.Option(0, help="Seeds the folds, the head and the map."),
    quiet: Quiet = False,
) -> None:
    """Audit a store: duplicates and train/test leaks, likely label errors, outliers, class
    balance and an embedding map, as one self-contained report.html plus audit.json."""
    from . import audit as au

    cut = au.NEAR_DUPLICATE_COSINE if threshold is None else threshold
    res = au.run_audit(store, out, threshold=cut, k=k, folds=folds, head=head, seed=seed,
                       images=images, draw_map=not no_map, fix_plan=fix_plan,
                       progress=not quiet)
    for note in res.data.get("notes", []):  # in the report too; said here, even with -q
        typer.echo(f"note: {note}", err=True)
    typer.echo(res.line())


if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:  # imported: as before
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    """The `embedpipe` command. Once a command has ended, a Ctrl-C while the interpreter
    shuts down (torch and OpenVINO take most of a second) is ignored: it ended the process
    by SIGINT, with no exit status, after "done" was printed. An interrupted command (exit
    130: it already said what it kept) ends through os._exit once the atexit handlers have
    run and the output is flushed, not through the interpreter's shutdown: after a Ctrl-C
    while torch was being imported, `python -m embedpipe.cli` said "interrupted" and then
    ended by SIGINT (-2, no exit status) in 7 of ~75 runs; each time the KeyboardInterrupt
    had been raised in code run by exec() (dataclasses build their methods so), which
    CPython's main loop may count as unhandled (Py_RunMain's exit by SIGINT). None since."""
    try:
        app()
    except SystemExit as e:
        if e.code == 130:
            import atexit

            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(130)
        _ignore_late_ctrl_c()
        raise
    _ignore_late_ctrl_c()


def _ignore_late_ctrl_c() -> None:
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
