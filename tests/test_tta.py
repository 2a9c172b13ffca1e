"""Test-time augmentation at extraction (`extract --tta`), with the real bundled weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from clitools import cli

from embedpipe import data as data_mod
from embedpipe.backbones import load_backbone, make_transform
from embedpipe.store import open_store


def few_images(src: Path, dst: Path, per_class: int = 2) -> Path:
    for c in sorted(p.name for p in src.iterdir())[:4]:
        (dst / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            (dst / c / f.name).write_bytes(f.read_bytes())
    return dst


def test_tta_flip_and_crops_are_the_mean_over_views_and_part_of_provenance(fmnist_src: Path,
                                                                           tmp_path: Path):
    data = few_images(fmnist_src, tmp_path / "data")
    common = ["--precision", "fp32", "--workers", "0", "-q"]
    stores = {}
    for tta in ("none", "flip", "flip,crops"):
        out = tmp_path / f"{tta}.h5"
        res = cli("extract", data, "-o", out, "--tta", tta, *common)
        assert res.exit_code == 0, res.output
        stores[tta] = open_store(out)
    plain, flip, both = stores["none"], stores["flip"], stores["flip,crops"]
    assert "tta" not in plain.meta["data_config"]
    assert flip.meta["data_config"]["tta"] == "flip"
    assert both.meta["data_config"]["tta"] == "crops,flip"

    # the reference: the model on each view, averaged, computed here without embedpipe's loop
    bb = load_backbone()
    transform = make_transform(bb.data_config)
    files = [data / p for p in plain.paths]
    x = torch.stack([transform(data_mod.load_image(f)) for f in files])
    with torch.inference_mode():
        ref_plain = bb.model(x).numpy()
        ref_flip = (bb.model(x) + bb.model(x.flip(-1))).numpy() / 2
    np.testing.assert_allclose(plain.features, ref_plain, atol=1e-4)
    np.testing.assert_allclose(flip.features, ref_flip, atol=1e-4)
    assert np.abs(flip.features - plain.features).max() > 1e-2
    assert np.abs(both.features - flip.features).max() > 1e-2

    # a store never mixes: a rerun without --tta on the flip store is refused, in one line
    res = cli("extract", data, "-o", tmp_path / "flip.h5", *common)
    assert res.exit_code == 2 and "tta" in res.output and "Traceback" not in res.output
    # a rerun with the same --tta extracts nothing
    res = cli("extract", data, "-o", tmp_path / "flip.h5", "--tta", "flip", *common)
    assert res.exit_code == 0 and "0 extracted" in res.output


def test_predict_from_images_uses_the_heads_tta(fmnist_src: Path, tmp_path: Path):
    data = few_images(fmnist_src, tmp_path / "data", per_class=3)
    store = tmp_path / "flip.h5"
    assert cli("extract", data, "-o", store, "--tta", "flip", "--precision", "fp32", "-q"
               ).exit_code == 0
    head = tmp_path / "h.skops"
    assert cli("fit", store, "--head", "knn", "-o", head, "-q").exit_code == 0
    out = tmp_path / "p.csv"
    res = cli("predict", head, data, "-o", out, "-q", "--keep-store", tmp_path / "kept.h5")
    assert res.exit_code == 0, res.output
    kept = open_store(tmp_path / "kept.h5")
    assert kept.meta["data_config"]["tta"] == "flip"
    np.testing.assert_allclose(np.sort(kept.features, axis=0),
                               np.sort(open_store(store).features, axis=0), atol=1e-5)


def test_bad_tta_is_one_line_error(fmnist_src: Path, tmp_path: Path):
    res = cli("extract", fmnist_src, "-o", tmp_path / "x.h5", "--tta", "rotate")
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "rotate" in lines[0] and "flip" in lines[0]
    assert not (tmp_path / "x.h5").exists()
