"""What made a set of features, and whether two such records match. Torch-free.

A store's *identity* is the record of everything that changes its features: the backbone
(``model``), its weights (``weights_source``, ``weights_sha256``), the preprocessing
(``data_config``: the model's timm data config plus JPEG draft decoding and test-time
augmentation), the pooling, ``feature_dim``, the numeric ``precision`` and the stored ``dtype``.
A store never mixes features of two identities; a head records the identity of the store it was
fitted on and is only applied to features of the same backbone, weights and preprocessing.

This module is the only one that decides whether two identities match (``diff``); callers
choose the wording and the severity of what differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError

#: Keys of a store's identity (HDF5 attributes of the store; see embedpipe.store.schema).
IDENTITY_KEYS = ("model", "weights_source", "weights_sha256", "data_config", "pool",
                 "feature_dim", "precision", "dtype")
#: Keys on which a head and the features it scores must agree (else: refused).
HEAD_KEYS = ("model", "weights_sha256", "data_config", "pool", "feature_dim")
#: Keys on which a head and the features it scores should agree (else: a note; features
#: differ slightly, e.g. bf16 vs fp32).
HEAD_NOTE_KEYS = ("precision", "dtype")
#: The stored precision of OpenVINO's bf16 features. Numeric precision is identity; f32 runtimes
#: (torch, OpenVINO) are interchangeable (cosine ≥ 0.99999, same head accuracy:
#: bench/results/runtime.md) and share ``fp32``; the bf16 of torch autocast and OpenVINO's bf16
#: inference precision round in other places (cosine between them as low as 0.99), so
#: OpenVINO's is recorded as a precision of its own and never mixes with torch's ``bf16``.
OV_BF16 = "bf16-openvino"
#: Values of a store's ``precision``.
STORED_PRECISIONS = ("fp32", "bf16", "fp16", OV_BF16)
#: Test-time augmentation views, in canonical order.
TTA_VIEWS = ("crops", "flip")


class OptionError(UserError):
    """An option's value cannot be used; the message names the option and the fix."""


def norm(v: Any) -> Any:
    """A comparable form of an identity value: JSON text (as stored in HDF5 attributes) is
    parsed, so ``'{"a": 1}'`` equals ``{"a": 1}``."""
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def diff(a: dict[str, Any], b: dict[str, Any], keys: Iterable[str] = IDENTITY_KEYS
         ) -> list[tuple[str, Any, Any]]:
    """The keys of ``keys`` on which identities ``a`` and ``b`` differ, as ``(key, a's value,
    b's value)`` (values normalised by ``norm``), in ``keys`` order."""
    out = []
    for k in keys:
        va, vb = norm(a.get(k)), norm(b.get(k))
        if va != vb:
            out.append((k, va, vb))
    return out


def diff_fields(a: dict[str, Any], b: dict[str, Any], keys: Iterable[str] = IDENTITY_KEYS
                ) -> list[str]:
    """``diff`` as text, one ``key: a vs b`` per difference; a differing dict (data_config)
    names its differing fields, e.g. ``data_config.input_size: [3, 224, 224] vs [3, 192, 192]``."""
    out = []
    for k, va, vb in diff(a, b, keys):
        if isinstance(va, dict) and isinstance(vb, dict):
            out += [f"{k}.{f}: {va.get(f, '(none)')!r} vs {vb.get(f, '(none)')!r}"
                    for f in sorted(set(va) | set(vb)) if va.get(f) != vb.get(f)]
        else:
            out.append(f"{k}: {va!r} vs {vb!r}")
    return out


def short(v: Any, width: int = 90) -> str:
    """An identity value in at most ``width`` characters, for messages."""
    v = norm(v)
    text = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else repr(v)
    return text if len(text) <= width else text[:width - 3] + "..."


def members(identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The identity of each store whose features a head or store holds: one, or several side by
    side for stacked stores (``{"stacked": [identity, ...], "feature_dim": total}``)."""
    return list(identity["stacked"]) if "stacked" in identity else [identity]


def parse_tta(text: str | None) -> str | None:
    """``--tta``: 'flip', 'crops' or both ('flip,crops', any order) → a canonical string
    ('crops,flip'); 'none' or empty → None (no test-time augmentation).

    Raises OptionError for an unknown view."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    parts = {p.strip().lower() for p in text.split(",") if p.strip()}
    bad = parts - set(TTA_VIEWS)
    if bad:
        raise OptionError(f"--tta {text}: unknown view(s) {', '.join(sorted(bad))}; pass flip, "
                          "crops, flip,crops or none")
    return ",".join(v for v in TTA_VIEWS if v in parts)


def identity_of(backbone: Any, opts: Any, precision: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The preprocessing and the identity of features of ``backbone`` made with ``opts``.

    ``backbone``: anything with ``identity()`` (model, weights_source, weights_sha256, pool,
    feature_dim) and ``data_config`` (timm's: input_size, interpolation, mean, std, crop_pct,
    crop_mode), i.e. embedpipe.backbones.Backbone; ``opts``: anything with ``exact_decode``,
    ``tta`` and ``dtype`` (ExtractOptions). Returns ``(data_config, identity)``: the data config
    with JPEG draft decoding and TTA added (what the loader applies), and the identity a store of
    these features records and is checked against (``data_config`` as sorted JSON text, as
    stored in HDF5)."""
    tta = parse_tta(opts.tta)
    data_config = {**backbone.data_config, "jpeg_draft": not opts.exact_decode,
                   **({"tta": tta} if tta else {})}
    identity = {**backbone.identity(), "data_config": json.dumps(data_config, sort_keys=True),
                "precision": precision, "dtype": opts.dtype}
    return data_config, identity


def stored_precision(precision: str, runtime: str) -> str:
    """The ``precision`` a store records for features of numeric ``precision`` (fp32, bf16,
    fp16) computed by ``runtime`` (torch or openvino): only OpenVINO's bf16 differs."""
    return OV_BF16 if runtime == "openvino" and precision == "bf16" else precision


def numeric_precision(stored: str) -> str:
    """The numeric precision of a stored one: ``bf16-openvino`` → ``bf16``."""
    return "bf16" if stored == OV_BF16 else stored


def runtime_for(stored: str | None) -> str:
    """The runtime that reproduces features of a stored precision: 'openvino' for
    bf16-openvino, 'torch' for bf16 and fp16 (torch autocast), 'auto' for fp32 (either)."""
    if stored == OV_BF16:
        return "openvino"
    return "torch" if stored in ("bf16", "fp16") else "auto"


def options_for(identity: dict[str, Any], *, weights: str | None = None,
                what: str = "the head") -> dict[str, Any]:
    """The extraction options (ExtractOptions fields) that reproduce ``identity``: the inverse of
    ``identity_of``. ``weights`` overrides where the backbone weights come from; without it, a
    file-weights identity needs its file where it was.

    Raises OptionError for stacked identities (several backbones), imported features (no
    backbone) and for a weights file that is no longer there (naming ``what`` and the fix: ``--weights PATH``)."""
    if "stacked" in identity:
        stacked = members(identity)
        raise OptionError(f"{what}: fitted on the stacked features of {len(stacked)} stores "
                          f"({' + '.join(str(i.get('model')) for i in stacked)}); this command "
                          "takes a head of one backbone: fit one on one store")
    source, _, where = str(identity["weights_source"]).partition(":")
    if source == "imported":
        raise OptionError(f"{what}: its features were imported (`embedpipe import-features`, "
                          f"model {identity.get('model')}); embedpipe has no backbone to embed "
                          "new images with: embed them where the features were made, import "
                          "them, and use the store (e.g. predict --store)")
    cfg = norm(identity["data_config"])
    opts: dict[str, Any] = {}
    if weights is not None:
        opts["weights"] = weights
    elif source == "random":
        opts["random_init"] = True
    elif source == "file":
        from pathlib import Path

        if not Path(where).is_file():
            raise OptionError(f"{what}: the head's backbone weights file {where} is not here; "
                              "pass --weights PATH to a copy of it (sha256 "
                              f"{str(identity['weights_sha256'])[:12]}…)")
        opts["weights"] = where
    else:
        opts["weights"] = source  # "bundled" or "hub"
    return dict(model=identity["model"],
                pool=None if identity["pool"] == "default" else identity["pool"],
                img_size=int(cfg["input_size"][-1]), crop_pct=float(cfg["crop_pct"]),
                precision=numeric_precision(identity["precision"]),
                runtime=runtime_for(identity["precision"]), dtype=identity["dtype"],
                exact_decode=not cfg.get("jpeg_draft", True), tta=cfg.get("tta"), **opts)


def stack_order(head: dict[str, Any], given: dict[str, Any],
                head_stores: list[str] | None = None,
                head_ids: list[str | None] | None = None) -> list[int] | None:
    """Whether the stacked stores ``given`` (a stacked store's metadata: ``stacked``
    identities, ``stores`` paths and ``store_ids``, store.stack) are the stores head identity
    ``head`` was fitted on in another order, so that each store's features would land in
    another's columns: for each of the head's stores in its order, the position of the given
    store that holds its features; None when they are in order, or not a reordering of them
    (the other checks name what differs). Told apart by identity (HEAD_KEYS: backbone,
    weights, preprocessing, pool), or, for stores of one identity, by their files: by
    ``head_ids`` (the head manifest's ``training.store_ids``: each store's creation id, kept
    when a store is renamed) when the head and every given store have one, else by
    ``head_stores`` (the resolved paths it was fitted on, ``training.stores``)."""
    from itertools import permutations

    from ._io import same_file

    mine, theirs = members(head), members(given)
    n = len(mine)
    if n < 2 or len(theirs) != n or "stacked" not in given:
        return None
    fits = [[not diff(theirs[j], mine[i], HEAD_KEYS) for j in range(n)] for i in range(n)]
    files = list(given.get("stores") or [])
    ids = list(given.get("store_ids") or [])
    by_file = None
    if ids_known(head_ids, n) and ids_known(ids, n):
        found = [[j for j, g in enumerate(ids) if g == h] for h in head_ids or []]
    elif head_stores and len(head_stores) == n and len(files) == n:
        found = [[j for j, f in enumerate(files) if same_file(f, h)] for h in head_stores]
    else:
        found = []
    if found and all(len(f) == 1 for f in found):
        by_file = [f[0] for f in found]
    in_order = list(range(n))
    if all(fits[i][i] for i in range(n)):  # in order by identity: perhaps not by file
        if by_file and sorted(by_file) == in_order and by_file != in_order:
            return by_file
        return None
    if by_file and sorted(by_file) == in_order and all(fits[i][by_file[i]] for i in range(n)):
        return by_file
    if n > 6:  # permutations of more stores than anyone stacks: leave it to the other checks
        return None
    return next((list(p) for p in permutations(range(n))
                 if all(fits[i][p[i]] for i in range(n))), None)


def ids_known(ids: Any, n: int) -> bool:
    """Whether ``ids`` (store_id values, a stacked store's ``store_ids`` or a head's
    ``training.store_ids``) names all ``n`` stores: none of them written before stores had
    one, and no two alike (copies of one file)."""
    ids = list(ids or [])
    return len(ids) == n and all(ids) and len(set(ids)) == n


def stack_order_error(head: dict[str, Any], given: dict[str, Any],
                      head_stores: list[str] | None, what: str, head_path: Any,
                      head_ids: list[str | None] | None = None) -> str | None:
    """The one line (after ``what``, the stores given) refusing stacked stores given in another
    order than the head's (stack_order), naming the order to pass them in; None when they are
    not a reordering."""
    order = stack_order(head, given, head_stores, head_ids)
    if order is None:
        return None
    files = list(given["stores"])
    mine = members(head)
    kinds = _told_apart(mine)
    if kinds:
        why = f"head {head_path} was fitted on {' + '.join(kinds)}, in that order"
    else:
        why = (f"head {head_path} was fitted on "
               f"{' + '.join(Path(str(files[j])).name for j in order)}, in that order (stores "
               "of one backbone, told apart by their files' store_id, which a rename keeps)"
               if ids_known(head_ids, len(order)) and ids_known(given.get("store_ids"),
                                                                len(order)) else
               f"head {head_path} was fitted on "
               f"{' + '.join(Path(str(files[j])).name for j in order)}, in that order (stores "
               "of one backbone, told apart by their files)")
    flags = " ".join(f"--store {files[j]}" for j in order)
    return (f"{what}: the stacked stores are given in another order, which would put each "
            f"store's features in another's columns; {why}: pass {flags}")


def _told_apart(idents: list[dict[str, Any]]) -> list[str] | None:
    """What tells identities ``idents`` apart, one text each: their models when those differ,
    else the model with the settings that differ (``pool=max``, ``data_config.input_size=
    [3, 240, 240]``, ``weights_sha256=579344248a93…``); None when nothing does."""
    models = [str(m.get("model")) for m in idents]
    if len(set(models)) > 1:
        return models
    out = [[m] for m in models]
    for k in HEAD_KEYS:
        values = [norm(i.get(k)) for i in idents]
        if len({json.dumps(v, sort_keys=True) for v in values}) < 2:
            continue
        if all(isinstance(v, dict) for v in values):
            fields = sorted({f for v in values for f in v
                             if len({json.dumps(w.get(f), sort_keys=True) for w in values}) > 1})
            for texts, v in zip(out, values):
                texts += [f"{k}.{f}={v.get(f, '(none)')}" for f in fields]
        else:
            for texts, v in zip(out, values):
                texts.append(f"{k}={str(v)[:12] + '…' if k == 'weights_sha256' else v}")
    return [" ".join(t) for t in out] if any(len(t) > 1 for t in out) else None
