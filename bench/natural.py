"""A small natural-image set built from what is reachable offline: Tux Paint's stamp photos.

Source: the Debian package ``tuxpaint-stamps-default`` (2022.06.04; stamps are under the GPL-2+ /
public-domain terms listed in its copyright file). Most of its stamps are real photographs cut out
on a transparent background (RGBA PNGs, 40–600 px), filed by subject. The set takes eight subject
folders whose stamps are mostly photos and keeps every PNG in them, no cartoon sub-folders:

| class | source folder(s) | images |
|---|---|---|
| birds | animals/birds | 35 |
| mammals | animals/mammals/** | 65 |
| fruit | food/fruit (not cartoon/) | 26 |
| vegetables | food/vegetables | 18 |
| flowers | plants/flowers/** | 25 |
| coins | symbols/money/** | 33 |
| roadsigns | town/roadsigns | 20 |
| christmas | seasonal/christmas | 18 |

240 distinct source images, each used once (no crops, no augmentation, no duplicates), split
reproducibly by a hash of the file name: about 70 % train, 30 % test per class (about 170 / 70).
It is a small, unbalanced set of clean cut-out objects — a stand-in for "a user's ~200 photos",
not a general natural-image benchmark. Road signs and some christmas stamps are drawings.

    python bench/natural.py            # builds cache/natural/tuxpaint-8/{train,test}/<class>/
                                       # and extracts its bundled-Lite0 store beside it

``apt-get download`` needs the Debian archive; an already downloaded ``.deb`` in cache/natural/
is reused.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

PACKAGE = "tuxpaint-stamps-default"
CLASSES = {
    "birds": ["animals/birds"],
    "mammals": ["animals/mammals"],
    "fruit": ["food/fruit"],
    "vegetables": ["food/vegetables"],
    "flowers": ["plants/flowers"],
    "coins": ["symbols/money"],
    "roadsigns": ["town/roadsigns"],
    "christmas": ["seasonal/christmas"],
}
TEST_SHARE = 0.3
BASE = bu.ROOT / "cache" / "natural"


def _deb(base: Path) -> Path:
    found = sorted(base.glob(f"{PACKAGE}_*.deb"))
    if found:
        return found[-1]
    base.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", PACKAGE], cwd=base, check=True)
    return sorted(base.glob(f"{PACKAGE}_*.deb"))[-1]


def _is_test(name: str) -> bool:
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return (h % 1000) / 1000 < TEST_SHARE


def build(base: Path = BASE) -> Path:
    """``base/tuxpaint-8/{train,test}/<class>/*.png`` (written once; returns the folder)."""
    out = base / "tuxpaint-8"
    if (out / "train").is_dir():
        return out
    deb = _deb(base)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        stamps = Path(tmp) / "usr/share/tuxpaint/stamps"
        staging = out.with_name(out.name + ".part")
        shutil.rmtree(staging, ignore_errors=True)
        for cls, folders in CLASSES.items():
            files = sorted(p for f in folders for p in (stamps / f).rglob("*.png")
                           if "cartoon" not in p.relative_to(stamps).parts)
            for p in files:
                name = "_".join(p.relative_to(stamps / folders[0]).parts)
                dest = staging / ("test" if _is_test(name) else "train") / cls / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dest)
        staging.rename(out)
    return out


def features(base: Path = BASE):
    """(image folder, store path) of bundled-Lite0 features of the set (incremental)."""
    from embedpipe.extract.local import run
    from embedpipe.extract.options import ExtractOptions

    data = build(base)
    store = base / "tuxpaint-8-lite0.h5"
    summary = run(data, store, ExtractOptions(), progress=True)
    print(summary.line(), file=sys.stderr)
    return data, store


def counts(data: Path) -> dict[str, dict[str, int]]:
    return {split: {c.name: len(list(c.glob("*.png"))) for c in sorted((data / split).iterdir())}
            for split in ("train", "test")}


if __name__ == "__main__":
    data, store = features()
    for split, per in counts(data).items():
        print(split, sum(per.values()), per)
    print(store)
