"""The audit as one self-contained HTML file: inline CSS, thumbnails as base64 data URIs read
from the image files, the map as inline SVG; no script, no server, no network."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Callable

THUMB_PX = 72  # longest side of a thumbnail
SHOW = 60  # rows of each ranked list (and duplicate groups) shown in the HTML; all in JSON

SECTIONS = ("summary", "balance", "duplicates", "label-issues", "outliers", "map", "notes")
"""The ids of the report's sections, in order (the browser test looks for each)."""

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:32px} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:middle}
th{background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
.thumb{width:72px;height:72px;object-fit:contain;background:#eee;display:block}
.missing{width:72px;height:72px;background:#fee;color:#a00;font-size:11px;display:flex;
align-items:center;justify-content:center;text-align:center}
.group{display:flex;gap:10px;flex-wrap:wrap;border:1px solid #ddd;padding:8px;margin:8px 0}
.group.bad{border-color:#d62728;background:#fff6f6} .member{width:150px;font-size:11px;
word-break:break-all} .tag{display:inline-block;padding:0 6px;border-radius:8px;
font-size:11px;margin-right:4px;background:#eee} .tag.leak{background:#d62728;color:#fff}
.tag.conflict{background:#ff7f0e;color:#fff} .path{font-size:11px;word-break:break-all}
.note{color:#555} code{background:#f4f4f4;padding:0 3px}
"""


def thumbnails(root: Path | None) -> Callable[[str], str]:
    """path (as stored) -> an <img> with the file's thumbnail inlined, or a box saying the
    file is missing or unreadable. Reads only (Pillow); never changes the file."""
    cache: dict[str, str] = {}

    def tag(path: str) -> str:
        if path in cache:
            return cache[path]
        from PIL import Image

        p = Path(path)
        if not p.is_absolute() and root is not None:
            p = root / p
        alt = html.escape(path, quote=True)
        try:
            with Image.open(p) as im:
                im.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
                im = im.convert("RGB")
                im.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
            uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            out = f'<img class="thumb" src="{uri}" alt="{alt}" title="{alt}">'
        except FileNotFoundError:
            out = f'<div class="missing" title="{alt}">missing file</div>'
        except Exception:  # noqa: BLE001 - any undecodable file is shown as such
            out = f'<div class="missing" title="{alt}">unreadable</div>'
        cache[path] = out
        return out

    return tag


def _table(headers: list[str], rows: list[list[str]], cls: list[str] | None = None) -> str:
    cls = cls or [""] * len(headers)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for c, v in zip(cls, r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def render(result: dict[str, Any], *, map_svg: str | None, root: Path | None) -> str:
    """The HTML text of the report for ``result`` (AuditResult.to_dict())."""
    thumb = thumbnails(root)
    s = result["summary"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>embedpipe audit: {_e(Path(result['store']).name)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>embedpipe audit of <code>{_e(result['store'])}</code></h1>"]
    summ = [[_e(k.replace("_", " ")), f"{v}"] for k, v in s.items()]
    parts.append(_section("summary", "Summary", _table(["finding", "count"], summ, ["", "n"])
                          + f'<p class="note">{result["rows"]} rows, {result["dim"]}-d '
                          f'features of {_e(result["model"])}; images under '
                          f'<code>{_e(result.get("images_root"))}</code>.</p>'))

    bal = result["balance"]
    splits = bal["splits"]
    rows = [[_e(c)] + [str(bal["counts"][sp].get(c, 0)) for sp in splits]
            + [str(sum(bal["counts"][sp].get(c, 0) for sp in splits))] for c in bal["classes"]]
    if bal["unlabeled"]:
        rows.append(["<i>unlabeled</i>"] + [str(bal["unlabeled_by_split"].get(sp, 0))
                                            for sp in splits] + [str(bal["unlabeled"])])
    body = _table(["class"] + splits + ["total"], rows, [""] + ["n"] * (len(splits) + 1))
    if bal.get("imbalance") is not None:
        body += (f'<p class="note">largest/smallest class: {bal["imbalance"]:.2f}x '
                 f'(all splits together).</p>')
    parts.append(_section("balance", "Class balance per split", body))

    dup = result["duplicates"]
    groups = dup["groups"]
    body = (f'<p class="note">{len(groups)} groups ({dup["exact_groups"]} exact, by content '
            f'hash; the rest near, cosine ≥ {dup["threshold"]}); {dup["leak_groups"]} span '
            f'splits (train/test leakage), {dup["conflict_groups"]} span classes (conflicting '
            f'labels). Groups that leak or conflict come first.</p>')
    for g in groups[:SHOW]:
        sims = (f"{g['min_sim']:.3f}" if g["min_sim"] == g["max_sim"]
                else f"{g['min_sim']:.3f}–{g['max_sim']:.3f}")
        tags = ("<span class='tag'>exact</span>" if g["exact"] else
                f"<span class='tag'>near, cosine {sims}</span>")
        tags += "<span class='tag leak'>leak</span>" if g["leak"] else ""
        tags += "<span class='tag conflict'>conflicting labels</span>" if g["conflict"] else ""
        members = "".join(
            f'<div class="member">{thumb(m["path"])}<div class="path">{_e(m["path"])}</div>'
            f'{_e(m["split"])} · {_e(m["label"] or "unlabeled")}'
            f'{" · <b>keep</b>" if m["row"] == g["keep"] else ""}</div>' for m in g["members"])
        bad = " bad" if g["leak"] or g["conflict"] else ""
        body += f'<div class="group{bad}"><div style="width:100%">{tags}</div>{members}</div>'
    if len(groups) > SHOW:
        body += f'<p class="note">… {len(groups) - SHOW} more groups in audit.json.</p>'
    parts.append(_section("duplicates", "Duplicates and train/test leaks", body))

    lab = result["label_issues"]
    if lab.get("skipped"):
        body = f'<p class="note">Skipped: {_e(lab["skipped"])}</p>'
    else:
        body = (f'<p class="note">{len(lab["issues"])} likely label errors among '
                f'{lab["rows"]} labeled rows: {_e(lab["method"])}; out-of-fold probabilities '
                f'from {lab["folds"]}-fold cross-validation of the {_e(lab["head"])} head '
                f'(out-of-fold accuracy {lab["oof_accuracy"]:.3f}).</p>')
        rows = [[str(k + 1), thumb(it["path"]), f'<span class="path">{_e(it["path"])}</span>',
                 _e(it["split"]), _e(it["label"]), _e(it["suggested_label"]),
                 f'{it["self_confidence"]:.3f}', f'{it["suggested_probability"]:.3f}']
                for k, it in enumerate(lab["issues"][:SHOW])]
        body += _table(["rank", "image", "path", "split", "given label", "suggested",
                        "p(given)", "p(suggested)"], rows,
                       ["n", "", "", "", "", "", "n", "n"])
    parts.append(_section("label-issues", "Likely label errors", body))

    out = result["outliers"]
    body = (f'<p class="note">Mean cosine distance to the {out["k"]} nearest '
            f'{_e(out["reference"])} rows (itself excluded): overall, and among rows of the '
            f'same class. High: far from everything, or far from its own class.</p>'
            '<h3>Overall</h3>')
    rows = [[str(k + 1), thumb(it["path"]), f'<span class="path">{_e(it["path"])}</span>',
             _e(it["split"]), _e(it["label"] or "unlabeled"), f'{it["distance"]:.3f}',
             "" if it["class_distance"] is None else f'{it["class_distance"]:.3f}']
            for k, it in enumerate(out["overall"][:SHOW // 2])]
    body += _table(["rank", "image", "path", "split", "label", "kNN distance",
                    "own-class kNN distance"], rows, ["n", "", "", "", "", "n", "n"])
    for cls, items in out["per_class"].items():
        body += f"<h3>{_e(cls)}</h3>"
        rows = [[str(k + 1), thumb(it["path"]), f'<span class="path">{_e(it["path"])}</span>',
                 _e(it["split"]), f'{it["class_distance"]:.3f}', f'{it["distance"]:.3f}']
                for k, it in enumerate(items[:10])]
        body += _table(["rank", "image", "path", "split", "own-class kNN distance",
                        "kNN distance"], rows, ["n", "", "", "", "n", "n"])
    parts.append(_section("outliers", "Outliers", body))

    mp = result["map"]
    if map_svg is None:
        body = f'<p class="note">No map: {_e(mp.get("skipped"))}</p>'
    else:
        body = (f'<p class="note">{_e(mp["method"])} of the features (PCA to 50 first); '
                f'{mp["rows"]} rows{" (sampled; every flagged row kept)" if mp["sampled"] else ""}'
                '. Colour: class; ringed: flagged (duplicate, label issue or top outlier); '
                'hover a dot for its path.</p>' + map_svg)
    parts.append(_section("map", "Embedding map", body))

    notes = "".join(f"<li>{_e(n)}</li>" for n in result["notes"]) or "<li>none</li>"
    parts.append(_section("notes", "Notes", f"<ul>{notes}</ul><p class='note'>embedpipe "
                          "never deletes or moves files; see the fix plan (--fix-plan) for "
                          "suggested actions.</p>"))
    parts.append("</body></html>")
    return "\n".join(parts)
