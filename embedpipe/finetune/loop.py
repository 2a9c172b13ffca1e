"""The fine-tuning loop: stages of epochs, evaluation, early stopping, checkpoints, outputs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import (
    decode_size,
    file_sha256,
    build_backbone,
    make_transform,
    out_of_memory,
)
from ..data import (
    discover,
)
from ..extract.loader import default_workers
from ..env import EXTRACT, versions
from ..errors import InterruptedRun
from ..extract.runtime import _warn, resolve_device
from ..progress import Progress, printer
from .checkpoint import (
    _atomic_save,
    _atomic_text,
    _differences,
    _save_checkpoint,
    _seed_epoch,
    _set_rng_state,
    backbone_state_with_head,
    record_tensor,
    resume_from,
    write_train_hashes,
)
from .data import _Images, _loader, plan_data, train_transform
from .memory import check_fits
from .options import (
    BEFORE_STUDY,
    FORMAT,
    PLOTS_HINT,
    STRICT,
    FinetuneError,
    FinetuneOptions,
    FinetuneResult,
    Outputs,
    check_options,
    check_output,
)
from .stages import (
    StageSplit,
    WarmupCosine,
    _param_groups,
    apply_freeze,
    backbone_trained_by,
    build_model,
    classifier_prefix,
    feature_stages,
    set_train_mode,
    unfrozen_at,
)


@contextlib.contextmanager
def _torch_settings(deterministic: bool, threads: int | None):
    """Deterministic algorithms and the intra-op thread count for the run, restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    n_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)
        torch.set_num_threads(n_threads)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The training precision: the one rule (extract.runtime.resolve_precision) with
    ``training``: auto on the CPU stays fp32. fp16 on the CPU is refused for training."""
    from ..extract.runtime import resolve_precision as rule

    if precision == "auto":
        return rule(precision, device, training=True)
    if precision == "fp16" and device.type == "cpu":
        raise FinetuneError("--precision fp16: not supported for training on the CPU; pass fp32 "
                            "(or bf16 on CPUs with native bf16)")
    return precision


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread) and of its finished child
    processes: ``resource.getrusage(RUSAGE_SELF)`` + ``getrusage(RUSAGE_CHILDREN)``. The loader
    workers are children that end with each epoch (no persistent workers), so at an epoch
    boundary their CPU time is in the count. Where ``resource`` is missing (Windows), this
    process's own time (``os.times``: user + system, children included where the OS reports
    them)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux/macOS
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class EMA:
    """Exponential moving average of the model's whole state (weights and BatchNorm buffers),
    updated after every optimizer step: ``ema = d * ema + (1 - d) * current`` with
    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the usual warmup, as timm's
    ModelEmaV2/V3 with warmup), so the first steps are not averaged with the untrained
    classifier. Integer buffers (BatchNorm's step count) are copied. Kept on the model's device
    in float32; ``state`` goes into the checkpoint, so ``resume`` continues it exactly."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            e = self.state[k]
            if e.is_floating_point():
                e.lerp_(v.detach(), 1.0 - d)
            else:
                e.copy_(v)
        self.updates += 1

    def load(self, saved: dict[str, Any]) -> None:
        self.updates = int(saved["updates"])
        for k, v in saved["state"].items():
            self.state[k].copy_(v)

    def saved(self) -> dict[str, Any]:
        return {"updates": self.updates,
                "state": {k: v.detach().cpu() for k, v in self.state.items()}}


# -- the run -------------------------------------------------------------------------------

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def finetune(data: str | Path, out: str | Path, opts: FinetuneOptions, *,
             resume: str | Path | None = None, overwrite: bool = False, progress: bool = True,
             say: Callable[[str], None] | None = None,
             notice: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``opts.model`` on the labeled images under ``data``; write the tuned backbone
    weights to ``out`` (and the manifest, history, classifier, curves and checkpoints beside
    it). ``resume``: a checkpoint file (or the checkpoint folder: its latest file).
    ``notice``: the base backbone's notes (weights from a finetune checkpoint: which entry),
    default ``say``.

    Raises a UserError (FinetuneError, WeightsError, ...: one line naming the input and the fix)
    for bad options, data, weights, checkpoints or outputs, and for running out of memory;
    InterruptedRun on Ctrl-C, naming the checkpoint that --resume continues (or none). On any
    failure the folders this call created are removed again while still empty, so a rerun of
    the same command finds things as they were."""
    t0 = time.perf_counter()
    cpu0 = cpu_seconds()
    say = say or printer(progress)
    check_options(opts)
    if opts.unfreeze and opts.head_epochs >= opts.epochs:
        _warn(f"note: --head-epochs {opts.head_epochs} >= --epochs {opts.epochs}: only the new "
              "classifier trains, the backbone's weights stay the base model's (its features "
              "do not change); raise --epochs to fine-tune it")
    out = Path(out)
    # a skipped checkpoint is said even with -q (progress off): the run goes back further
    ckpt_path, ckpt = (resume_from(Path(resume), _warn) if resume is not None
                       else (None, None))
    outs = check_output(out, ckpt_path, overwrite, inputs=(
        data, None if opts.weights in (None, "bundled", "hub") else opts.weights))
    outs.last = ckpt_path
    try:
        return _run(data, outs, opts, ckpt_path, ckpt, progress, say, t0, cpu0,
                    notice or say)
    except BaseException as e:
        outs.remove_made()  # the folders this call made, if nothing was written in them
        if isinstance(e, KeyboardInterrupt):
            raise InterruptedRun(_interrupted(outs, ckpt_path)) from None
        if out_of_memory(e):
            raise FinetuneError(f"out of memory while training with --batch-size "
                                f"{opts.batch_size}; pass a smaller --batch-size or --img-size"
                                ) from None
        raise


def _interrupted(outs: Outputs, resumed: Path | None) -> str:
    """What Ctrl-C kept, and how to go on: the checkpoint to --resume, else a rerun."""
    done = outs.resumable()
    if done is None:
        return ("interrupted before the first checkpoint of this run was written; nothing to "
                "resume: rerun the same command")
    if done == resumed:
        return (f"interrupted before a new checkpoint was written; rerun the same command "
                f"(it resumes from {done} again)")
    return (f"interrupted; the last checkpoint is {done.name}: continue with the same command "
            f"plus --resume {done}")


def _run(data: str | Path, outs: Outputs, opts: FinetuneOptions, ckpt_path: Path | None,
         ckpt: dict[str, Any] | None, progress: bool, say: Callable[[str], None], t0: float,
         cpu0: float, notice: Callable[[str], None]) -> FinetuneResult:
    """The run after the checks: load, train epoch by epoch, write the outputs to ``outs``
    (resuming from ``ckpt``, loaded from ``ckpt_path``, when given)."""
    out = outs.weights
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    deterministic = device.type == "cpu" if opts.deterministic is None else opts.deterministic
    workers = default_workers() if opts.workers is None else opts.workers
    disc = discover(data, opts.layout)
    backbone = build_backbone(opts)
    for note in backbone.notes:  # base weights from a finetune checkpoint: its entry
        notice(note)
    base_keys = list(backbone.model.state_dict())
    data_config = backbone.data_config
    plan = plan_data(disc, opts, data_config, workers, say)
    classes = plan.classes
    model = build_model(backbone, len(classes), opts.seed, opts.dropout)
    prefix = classifier_prefix(model)
    if opts.unfreeze > 0:
        split = feature_stages(model, opts.model)
        if opts.unfreeze > len(split.stages):
            raise FinetuneError(
                f"--unfreeze {opts.unfreeze}: {opts.model} has {len(split.stages)} feature "
                f"stages ({split.names[0]} … {split.names[-1]}); pass 0 to {len(split.stages)} "
                f"({len(split.stages)} trains the whole backbone)")
    else:
        head_names = [n for n, p in model.named_parameters()
                      if n.startswith(prefix + ".")]
        split = StageSplit([], [], [], [n for n, _ in model.named_parameters()
                                        if n not in head_names], head_names)
    fingerprint = json.loads(json.dumps({
        **{k: getattr(opts, k) for k in STRICT}, "base_weights_sha256": backbone.weights.sha256,
        "data_config": data_config, "classes": classes, **plan.fingerprint()}))
    soft = {"device": str(device), "precision": precision, "workers": workers,
            "threads": opts.threads or torch.get_num_threads(), "deterministic": deterministic}
    if ckpt is not None:
        diffs = _differences({**BEFORE_STUDY, **ckpt["fingerprint"]}, fingerprint)
        if diffs:
            raise FinetuneError(
                f"--resume {ckpt_path}: the checkpoint is from another run ({'; '.join(diffs[:4])}"
                f"{'; …' if len(diffs) > 4 else ''}); rerun with that run's DATA and options, or "
                "leave out --resume to start afresh")
        changed = [f"{k} {ckpt['soft'].get(k)!r} → {v!r}" for k, v in soft.items()
                   if ckpt["soft"].get(k) != v]
        if changed:
            say(f"note: resuming with {', '.join(changed)}: the continuation is valid but not "
                "bit-identical to an uninterrupted run")

    check_fits(model, split, opts, data_config, device, len(plan.train))
    model.to(device)
    groups = _param_groups(model, split, opts)
    optimizer = torch.optim.AdamW(groups, lr=opts.head_lr, weight_decay=opts.weight_decay)
    n_train, n_val = len(plan.train), len(plan.val)
    drop_last = n_train > opts.batch_size and n_train % opts.batch_size == 1  # BN needs 2+
    steps_per_epoch = n_train // opts.batch_size if drop_last else math.ceil(n_train / opts.batch_size)
    head_epochs = min(opts.head_epochs, opts.epochs)
    bounds = [b for b in (head_epochs * steps_per_epoch, opts.epochs * steps_per_epoch) if b > 0]
    bounds = sorted(set(bounds))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(bounds, round(opts.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = (torch.autocast(device.type, dtype=_AMP[precision]) if precision in _AMP
           else contextlib.nullcontext())
    class_weight = None
    if opts.class_weight == "balanced":
        counts = np.bincount([y for _, y, _ in plan.train], minlength=len(classes))
        class_weight = torch.tensor(n_train / (len(classes) * counts), dtype=torch.float32,
                                    device=device)
    mixup = None
    if opts.cutmix:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode="batch",
                      label_smoothing=opts.label_smoothing, num_classes=len(classes))

    min_size = decode_size(data_config)
    train_ds = _Images(plan.train, train_transform(data_config, opts), min_size, opts.max_pixels)
    val_ds = _Images(plan.val, make_transform(data_config), min_size, opts.max_pixels)
    ema = EMA(model, opts.ema) if opts.ema else None

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "val_accuracy": None, "val_loss": None, "state": None}
    start_epoch, bad_epochs, stopped = 0, 0, False
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load(ckpt["ema"])
        _set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        start_epoch, bad_epochs = int(ckpt["epoch"]), int(ckpt["bad_epochs"])
        stopped = bool(ckpt["stopped"])
        say(f"resuming from {ckpt_path} after epoch {start_epoch} of {opts.epochs}")

    say(f"fine-tuning {opts.model} ({backbone.weights.describe()}) on {n_train} training images, "
        f"{len(classes)} classes; validation: {plan.val_source}; input "
        f"{data_config['input_size'][1]}px, {device}, {precision}; "
        f"{_plan_text(opts, split)}")
    for rel, reason in plan.skipped[:20]:
        say(f"skipped {rel}: {reason}")
    if len(plan.skipped) > 20:
        say(f"... and {len(plan.skipped) - 20} more skipped files")
    if plan.left_out:
        say("not used for training: " + ", ".join(f"{n} in split {s or '(none)'}"
                                                   for s, n in sorted(plan.left_out.items())))

    skipped_live: list[tuple[str, str]] = []
    # The record of the images the backbone of an epoch's weights was trained on: this run's
    # training images once a stage of the backbone has trained, plus a fine-tuned base's
    # record. Until then (head-only epochs; all of them without --unfreeze or with
    # --head-epochs >= --epochs) only the new classifier trains and the backbone is the
    # base's byte for byte, so the record is the base's alone. Each checkpoint holds its
    # epoch's; RUN.train-hashes is the kept epoch's (helper-38's F9, and a kept head-only
    # epoch: --keep best, --budget).
    base_record = [h.decode() for h in (backbone.finetune_hashes
                                        if backbone.finetune_hashes is not None else [])]
    own = [h for _, _, h in plan.train]

    def trained_on(epochs: int) -> list[str]:
        return own + base_record if backbone_trained_by(epochs, opts) else base_record

    records: dict[bool, torch.Tensor] = {}  # checkpoints' records, by backbone_trained_by
    epoch = start_epoch
    by_budget, epoch_cpu = False, 0.0
    with _torch_settings(deterministic, opts.threads):
        while epoch < opts.epochs and not stopped:
            used = cpu_seconds() - cpu0
            if (opts.budget is not None and epoch > start_epoch
                    and used + epoch_cpu > opts.budget):
                by_budget = True  # the next epoch would not fit: stop at this boundary
                say(f"--budget {opts.budget:g}: {used:.1f} CPU s used, the next epoch "
                    f"needs ~{epoch_cpu:.1f}; stopping after epoch {epoch} of "
                    f"{opts.epochs} (continue with --resume {outs.last})")
                break
            c0 = cpu_seconds()
            k = unfrozen_at(epoch, opts)
            apply_freeze(model, split.trainable(k))
            stage = 1 if epoch < head_epochs or opts.unfreeze == 0 else 2
            gen = _seed_epoch(opts.seed, epoch)
            e0 = time.perf_counter()
            tr = _train_epoch(model, train_ds, opts, workers, gen, drop_last, device, amp,
                              scaler, optimizer, sched, class_weight, mixup, progress,
                              f"epoch {epoch + 1}/{opts.epochs}", skipped_live, ema)
            lrs = tr["lr"]
            va = _evaluate(model, val_ds, opts, workers, device, amp) if n_val else None
            va_ema = None
            if ema is not None:
                va_ema = _evaluate_state(model, ema.state, val_ds, opts, workers, device,
                                         amp) if n_val else None
            # the epoch's candidate: the trained weights, or their EMA when it validates
            # better (higher accuracy, then lower loss); without validation the EMA
            use_ema = ema is not None and (va is None or (va_ema is not None and (
                va_ema["accuracy"], -va_ema["loss"]) > (va["accuracy"], -va["loss"])))
            cand = va_ema if use_ema else va
            epoch += 1
            improved = False
            if opts.keep == "last":  # improved: better than every earlier epoch (patience)
                prior = [v for v in map(_kept_val, history) if v[0] is not None]
                improved = cand is None or not prior or (
                    (cand["accuracy"], -cand["loss"]) > max((a, -lo) for a, lo in prior))
            elif cand is None:
                improved = True
            elif (best["val_accuracy"] is None or cand["accuracy"] > best["val_accuracy"]
                  or (cand["accuracy"] == best["val_accuracy"]
                      and cand["loss"] < best["val_loss"])):
                improved = True
            if improved or opts.keep == "last":
                best = {"epoch": epoch, "val_accuracy": cand["accuracy"] if cand else None,
                        "val_loss": cand["loss"] if cand else None,
                        "weights": "ema" if use_ema else "trained",
                        "state": ({k: v.detach().cpu().clone() for k, v in ema.state.items()}
                                  if use_ema else backbone_state_with_head(model))}
            if stage == 2 and n_val and opts.patience:
                bad_epochs = 0 if improved else bad_epochs + 1
                stopped = bad_epochs >= opts.patience and epoch < opts.epochs
            epoch_cpu = cpu_seconds() - c0  # this epoch's training and validation
            row = {"epoch": epoch, "stage": stage, "unfrozen_stages": k,
                   "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                   "val_loss": va["loss"] if va else None,
                   "val_accuracy": va["accuracy"] if va else None,
                   "lr_head": lrs.get("head"), "lr_backbone": lrs.get("backbone") if k else 0.0,
                   "images": tr["images"], "seconds": round(time.perf_counter() - e0, 2),
                   "cpu_seconds": round(epoch_cpu, 2),
                   "best": improved or opts.keep == "last"}
            if ema is not None:
                row.update({"val_loss_ema": va_ema["loss"] if va_ema else None,
                            "val_accuracy_ema": va_ema["accuracy"] if va_ema else None,
                            "kept": "ema" if use_ema else "trained"})
            history.append(row)
            say(_epoch_line(row, opts.epochs) + ("  (early stop)" if stopped else ""))
            tuned_yet = backbone_trained_by(epoch, opts)
            if tuned_yet not in records:
                records[tuned_yet] = record_tensor(trained_on(epoch))
            _save_checkpoint(outs.checkpoint(epoch), outs, opts, fingerprint, soft, epoch, model,
                             optimizer, sched, scaler, history, best, bad_epochs, stopped,
                             ema.saved() if ema is not None else None, records[tuned_yet])

    if best["state"] is None:  # resumed from a finished checkpoint without a best state
        best["state"] = backbone_state_with_head(model)
    cpu_used = cpu_seconds() - cpu0
    state = best["state"]
    tuned = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    if set(tuned) != set(base_keys):
        raise FinetuneError(f"{opts.model}: the tuned state dict does not match the "
                            "num_classes=0 model's keys; this model cannot be saved headless")
    head = {k.removeprefix(prefix + "."): v for k, v in state.items()
            if k.startswith(prefix + ".")}
    _atomic_save(tuned, out)
    _atomic_save(head, outs.classifier)
    kept = best["epoch"] or epoch
    if not backbone_trained_by(kept, opts) and backbone_trained_by(opts.epochs, opts):
        # the run was to fine-tune the backbone, but the weights it keeps are a head-only
        # epoch's: said even with -q, as the --head-epochs >= --epochs note
        why, fix = ((f"--keep {opts.keep} chose it over the later epochs", "")
                    if backbone_trained_by(epoch, opts) else
                    ("the run stopped before the backbone trained",
                     f"; continue with --resume {outs.last} to fine-tune it"))
        _warn(f"note: the kept weights are epoch {kept}'s ({why}), from before the backbone "
              f"is unfrozen at epoch {opts.head_epochs + 1}: the backbone is the base model's, "
              f"byte for byte, so {outs.train_hashes.name} records none of this run's "
              f"images{fix}")
    record = write_train_hashes(outs, trained_on(kept))
    sha = file_sha256(out)
    history_doc = {"format": FORMAT, "classes": classes, "history": history,
                   "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"]}
    _atomic_text(json.dumps(history_doc, indent=2) + "\n", outs.history)
    curves = _plot(history, head_epochs, best["epoch"], outs.curves, say)
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "weights_file": out.name, "weights_sha256": sha,
        "classifier_file": outs.classifier.name,
        # the sha256 of every training image (not the validation ones), one a line: `extract
        # --weights` copies it into the store, so accuracies over those rows say they overrate
        **record,
        "model": opts.model,
        "base_weights": {"source": backbone.weights.describe(),
                         "sha256": backbone.weights.sha256},
        "data_config": data_config,
        "classes": classes,
        "data": {"root": str(plan.root), "layout": plan.layout, "validation": plan.val_source,
                 "train_per_class": plan.counts("train"), "val_per_class": plan.counts("val"),
                 "skipped": len(plan.skipped) + len(skipped_live), "left_out": plan.left_out},
        "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"], "epochs_run": epoch,
        "stopped_early": bool(stopped and epoch < opts.epochs),
        "stopped_by_budget": by_budget,
        "best_weights": best.get("weights", "trained"),
        "cpu_seconds": round(cpu_used, 1),  # this call's (a resumed run: since the resume)
        # every epoch's training + validation CPU seconds, over all the calls of a resumed run
        "epochs_cpu_seconds": round(sum(r.get("cpu_seconds") or 0.0 for r in history), 1),
        "budget": ({"cpu_seconds": opts.budget, "used": round(cpu_used, 1),
                    "stopped": by_budget, "measure": "getrusage SELF + CHILDREN"}
                   if opts.budget is not None else None),
        "stages": {"names": split.names, "post": sorted({n.rsplit(".", 2)[0] for n in split.post}),
                   "unfreeze": opts.unfreeze, "gradual": opts.gradual},
        "options": asdict(opts), "device": str(device), "precision": precision,
        "deterministic": deterministic, "workers": workers,
        "history_file": outs.history.name, "curves_file": curves.name if curves else None,
        "seconds": round(seconds, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(*EXTRACT),
    }
    _atomic_text(json.dumps(manifest, indent=2) + "\n", outs.manifest)
    return FinetuneResult(out, outs.manifest, outs.history, outs.classifier, curves, outs.last,
                          opts.model, classes, n_train, n_val, best["epoch"],
                          best["val_accuracy"], epoch, manifest["stopped_early"], seconds, sha,
                          int(data_config["input_size"][1]), history,
                          plan.skipped + skipped_live, sum(plan.left_out.values()),
                          by_budget, cpu_used, best.get("weights", "trained"))


def _plan_text(opts: FinetuneOptions, split: StageSplit) -> str:
    head = min(opts.head_epochs, opts.epochs)
    if opts.unfreeze == 0:
        return f"classifier only for {opts.epochs} epochs"
    last = split.names[len(split.names) - opts.unfreeze:]
    what = (f"then one more stage every {opts.stage_epochs} epoch(s) deep to shallow up to "
            f"{', '.join(last)}" if opts.gradual else f"then {', '.join(last)}")
    if split.post:
        what += " + " + ", ".join(sorted({n.split(".")[0] for n in split.post}))
    return f"classifier only for {head} epoch(s), {what} for {opts.epochs - head}"


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out.setdefault(g["name"].split("-")[0], float(g["lr"]))
    return out


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f}"
           if row["val_accuracy"] is not None else "no val")
    if row.get("val_accuracy_ema") is not None:
        val += f" (EMA {row['val_accuracy_ema']:.3f}, kept {row['kept']})"
    lr_bb = f"{row['lr_backbone']:.1e}" if row["lr_backbone"] else "frozen"
    return (f"epoch {row['epoch']}/{epochs} stage {row['stage']} (unfrozen {row['unfrozen_stages']})"
            f": loss {row['train_loss']:.4f} train acc {row['train_accuracy']:.3f} {val} "
            f"lr head {row['lr_head']:.1e} backbone {lr_bb} {row['seconds']:.1f} s"
            + ("  *best" if row["best"] else ""))


def _train_epoch(model, ds, opts, workers, gen, drop_last, device, amp, scaler, optimizer,
                 sched, class_weight, mixup, progress, label, skipped,
                 ema: EMA | None = None) -> dict[str, float]:
    set_train_mode(model, opts.bn_frozen)
    loader = _loader(ds, opts.batch_size, workers, shuffle=True, generator=gen,
                     drop_last=drop_last, pin=device.type == "cuda")
    total_loss, correct, seen = 0.0, 0, 0
    lrs = _group_lrs(optimizer)
    with Progress(len(ds), label, enabled=progress) as bar:
        for batch in loader:
            skipped += batch["bad"]
            n = len(batch["y"])
            if batch["x"] is None or n < 2:
                bar.update(n + len(batch["bad"]))
                continue
            x = batch["x"].to(device, non_blocking=True)
            y = batch["y"].to(device, non_blocking=True)
            target = None
            if mixup is not None and n % 2 == 0:
                x, target = mixup(x, y)
            with amp:
                logits = model(x)
            logits = logits.float()
            if target is not None:
                loss = F.cross_entropy(logits, target, weight=class_weight)
            else:
                loss = F.cross_entropy(logits, y, weight=class_weight,
                                       label_smoothing=opts.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            lrs = _group_lrs(optimizer)  # the learning rates this step used
            sched.step()
            total_loss += float(loss.detach()) * n
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += n
            bar.update(n + len(batch["bad"]))
    if seen == 0:
        raise FinetuneError("no training batch could be used in this epoch (every image failed "
                            "to load, or fewer than 2 images); check the data")
    return {"loss": total_loss / seen, "accuracy": correct / seen, "images": seen, "lr": lrs}


@torch.no_grad()
def _evaluate(model, ds, opts, workers, device, amp) -> dict[str, float] | None:
    model.eval()
    loader = _loader(ds, opts.batch_size, workers, shuffle=False, pin=device.type == "cuda")
    total_loss, correct, seen = 0.0, 0, 0
    for batch in loader:
        if batch["x"] is None:
            continue
        x, y = batch["x"].to(device), batch["y"].to(device)
        with amp:
            logits = model(x)
        logits = logits.float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    if seen == 0:
        return None
    return {"loss": total_loss / seen, "accuracy": correct / seen}


def _kept_val(row: dict[str, Any]) -> tuple[float | None, float | None]:
    """(validation accuracy, loss) of the weights an epoch offered: its EMA or trained ones."""
    if row.get("kept") == "ema":
        return row["val_accuracy_ema"], row["val_loss_ema"]
    return row["val_accuracy"], row["val_loss"]


def _evaluate_state(model, state, ds, opts, workers, device, amp) -> dict[str, float] | None:
    """Validation of ``state`` (the EMA weights) in ``model``; the trained weights are put
    back bit for bit afterwards (load_state_dict copies in place, so the optimizer's
    references stay valid)."""
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    try:
        return _evaluate(model, ds, opts, workers, device, amp)
    finally:
        model.load_state_dict(trained)


def _plot(history: list[dict[str, Any]], head_epochs: int, best_epoch: int, path: Path,
          say: Callable[[str], None]) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        say(f"note: matplotlib is not installed, so no loss/accuracy curves PNG ({PLOTS_HINT})")
        return None
    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    for ax, key, title in ((fig.add_subplot(1, 2, 1), "loss", "loss"),
                           (fig.add_subplot(1, 2, 2), "accuracy", "accuracy")):
        ax.plot(ep, [r[f"train_{key}"] for r in history], "o-", label="train (augmented)")
        val = [r[f"val_{key}"] for r in history]
        if any(v is not None for v in val):
            ax.plot(ep, [np.nan if v is None else v for v in val], "o-", label="validation")
        if 0 < head_epochs < len(ep) + 1:
            ax.axvline(head_epochs + 0.5, color="grey", ls=":", label="backbone unfrozen")
        if best_epoch:
            ax.axvline(best_epoch, color="green", ls="--", alpha=0.5, label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
