"""The fix plan: a CSV of suggested actions a user reviews and edits; embedpipe never acts on
it (nothing is deleted or moved)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

COLUMNS = ("path", "action", "reason", "suggested_label", "score")
ACTIONS = ("drop-duplicate", "review-label", "review-outlier")


def plan(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the plan from an audit (AuditResult.to_dict()): every duplicate but the kept
    one -> drop-duplicate (score: the group's highest similarity); the kept member of a group
    with conflicting labels, and each likely label error -> review-label (score: 1 - the
    probability of the given label); the flagged outliers -> review-outlier (score: kNN
    distance). One row per path and action."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()

    def add(path: str, action: str, reason: str, label: Any, score: float) -> None:
        if (path, action) not in seen:
            seen.add((path, action))
            rows.append({"path": path, "action": action, "reason": reason,
                         "suggested_label": label or "", "score": f"{score:.4f}"})

    for g in result["duplicates"]["groups"]:
        keep = next(m for m in g["members"] if m["row"] == g["keep"])
        kind = ("exact duplicate" if g["exact"]
                else f"near duplicate (cosine ≥ {g['min_sim']:.3f})")
        why = kind + f" of {keep['path']}"
        if g["leak"]:
            why += f"; spans splits {'/'.join(g['splits'])} (leak)"
        if g["conflict"]:
            why += f"; conflicting labels {'/'.join(g['labels'])}"
        for m in g["members"]:
            if m["row"] != g["keep"]:
                add(m["path"], "drop-duplicate", why, m["label"], g["max_sim"])
        if g["conflict"]:
            add(keep["path"], "review-label", f"duplicates carry labels {'/'.join(g['labels'])}",
                "", g["max_sim"])
    for it in result["label_issues"].get("issues", []):
        add(it["path"], "review-label",
            f"labeled {it['label']}; out-of-fold p={it['self_confidence']:.3f}, "
            f"{it['suggested_label']} p={it['suggested_probability']:.3f}",
            it["suggested_label"], 1.0 - it["self_confidence"])
    for it in result["outliers"]["flagged"]:
        add(it["path"], "review-outlier", f"kNN cosine distance {it['distance']:.3f} "
            f"(rank {it['rank']} overall)", "", it["distance"])
    return rows


def write(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
