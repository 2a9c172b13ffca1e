"""Backbones and their weights: files that do not fit the model, or whose pickle would run code, are refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from clitools import EMBEDPIPE, cli, one_line, run


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_with_wrong_shapes_or_a_pickle_payload_are_refused(fmnist_src: Path,
                                                                    tmp_path: Path):
    import timm

    data = fmnist_src / "bag"
    sd = timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict()
    sd["conv_head.weight"] = torch.zeros(10, 3, 1, 1)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    res = cli("extract", data, "-o", tmp_path / "w.h5", "--weights", wrong)
    one_line(res.output, res.exit_code, str(wrong), "do not fit tf_efficientnet_lite0",
                   "conv_head.weight", "--weights")
    assert not (tmp_path / "w.h5").exists()

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    res = run(*EMBEDPIPE, "extract", data, "-o", tmp_path / "e.h5", "--weights", evil)
    one_line(res.stdout + res.stderr, res.returncode, str(evil), "cannot read weights",
                   "state dict")
    res = cli("extract", data, "-o", tmp_path / "e.h5", "--weights", evil)
    one_line(res.output, res.exit_code, str(evil), "cannot read weights")
    assert not marker.exists()
