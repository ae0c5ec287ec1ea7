"""The paper-scale tools (benchmarks/paper_costs.py, paper_plan.py, gpu_check.py) and paper-only
branches that had no test of their own (AME-CAM at full width and output stride 32)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402
import paper_costs  # noqa: E402
import paper_plan  # noqa: E402


def _conv_flops(cin: int, cout: int, k: int, h: int, w: int) -> int:
    """Multiply-adds of a stride-1 'same' convolution, counted as 2 FLOPs each (naive loop count)."""
    total = 0
    for _ in range(h * w):
        total += cin * cout * k * k
    return 2 * total


def test_flop_count_matches_the_naive_convolution_count():
    net = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1))  # noqa: E731
    run = lambda m: m(torch.rand(paper_costs.B, 3, 16, 16, device="meta"))  # noqa: E731
    f1, f2 = _conv_flops(3, 8, 3, 16, 16), _conv_flops(8, 4, 3, 16, 16)
    fwd = paper_costs.count(net, run, backward=False)
    assert fwd["flops"] == f1 + f2
    assert fwd["params"] == 3 * 8 * 9 + 8 + 8 * 4 * 9 + 4
    train = paper_costs.count(net, run, backward=True)
    # backward: weight gradients of both layers (= their forward), the input gradient of layer 2 only
    assert train["flops"] == 2 * f1 + 3 * f2
    # saved for backward: at least the input of each layer (fp32, per sample)
    assert train["saved_bytes"] >= 4 * (3 * 16 * 16 + 8 * 16 * 16)
    assert torch.autocast is paper_costs._AUTOCAST  # the meta workaround is undone


def test_peak_live_bytes_of_a_forward_without_autograd():
    """Input (3 ch), conv1 output (8 ch) and conv2 output (4 ch) are all alive at the end of the
    forward (the Sequential still holds conv1's output when conv2 writes), fp32, 16 x 16."""
    net = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1))  # noqa: E731
    run = lambda m: m(torch.rand(paper_costs.B, 3, 16, 16, device="meta"))  # noqa: E731
    assert paper_costs.peak_live_bytes(net, run) == 4 * 16 * 16 * (3 + 8 + 4)

    def chain(m):  # a freed intermediate no longer counts: only two 8-channel maps at a time
        x = torch.rand(paper_costs.B, 8, 16, 16, device="meta")
        for _ in range(5):
            x = m(x)
        return x

    assert paper_costs.peak_live_bytes(lambda: torch.nn.Conv2d(8, 8, 3, padding=1), chain) == 4 * 16 * 16 * 8 * 2


def test_flop_count_restores_autocast_when_the_network_fails():
    def boom(m):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        paper_costs.count(lambda: torch.nn.Linear(2, 2), boom, backward=True)
    assert torch.autocast is paper_costs._AUTOCAST


def test_plan_splits_agree_with_the_split_rules():
    from wsss_bench.data.splits import split_sizes

    assert paper_plan.DATA["brats"]["split"] == split_sizes(paper_plan.DATA["brats"]["cases"], "tenths")
    assert paper_plan.DATA["flare"]["split"] == split_sizes(paper_plan.DATA["flare"]["cases"], "flare21")
    c = paper_plan.counts("brats")
    assert c["all"] == 193_905 and c["train"] == 1001 * 155
    assert c["test"] == pytest.approx(5802 + 1073)  # the paper's BraTS test set


def test_gpu_check_flags_non_finite_results(tmp_path):
    ok, bad = tmp_path / "ok.parquet", tmp_path / "bad.parquet"
    pd.DataFrame({"dice": [0.5, 1.0], "task": ["a", "b"]}).to_parquet(ok)
    pd.DataFrame({"dice": [0.5, np.nan], "task": ["a", "b"]}).to_parquet(bad)
    assert gpu_check.results_finite(ok)
    assert not gpu_check.results_finite(bad)
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"dice": []}).to_parquet(empty)
    assert not gpu_check.results_finite(empty)


def test_amecam_full_width_at_output_stride_32_matches_timm_resnet18():
    """The paper's AME-CAM encoder: channels [] (full width) at output stride 32."""
    from wsss_bench._compat import import_timm
    from wsss_bench.nn import amecam as am

    spec = {"channels": [], "output_stride": 32}
    reference = import_timm().create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    assert am.widths(spec) == tuple(reference.feature_info.channels())
    net = am.MultiExitResNet(spec, in_chans=4).eval()
    with torch.no_grad():
        logits, maps = net(torch.rand(2, 4, 64, 64))
    assert logits.shape == (2, 4)
    assert [m.shape[-1] for m in maps] == am.feature_sizes(64, 32) == [16, 8, 4, 2]
    simclr = am.SimCLRNet(spec, in_chans=4)
    assert set(simclr.encoder.state_dict()) == set(net.encoder.state_dict())  # stage 0 hands its encoder on by name
