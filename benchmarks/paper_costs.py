"""FLOPs, parameters and saved activations of every paper-profile network, per step.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device: the networks are
the project's own builders with the paper profile's values, the inputs have the paper's shapes
(256 px, 4 BraTS channels), and nothing is computed, so the count costs seconds on any machine.
A FLOP here is one multiply or one add (a multiply-add is 2), as the counter reports them; only
matrix products and convolutions are counted (the element-wise rest is a few per cent).

Memory for backward is the sum of the bytes of every tensor autograd saves (a saved-tensor
hook sees each one; a tensor saved twice counts twice), an upper bound on the activation
memory a training step holds at its peak.  Memory of a forward without autograd is the peak
of the operator outputs alive at once (a dispatch mode adds each output's bytes and a weak
reference subtracts them when Python frees it).  :mod:`paper_plan` turns these into GPU-hours,
GPU memory and the plan in docs/scale.md.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

B = 2  # meta batch: counts are per sample (divided by B); FLOPs are linear in the batch


_AUTOCAST = torch.autocast


class _MetaAutocast(_AUTOCAST):
    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


def _build_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` on the meta device; a constructor that reads a tensor's values is built on
    the CPU and moved."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        return build().to("meta")


@contextmanager
def _meta_autocast() -> Iterator[None]:
    """autocast has no meta device type: while counting, a meta autocast acts as the CPU's."""
    torch.autocast = _MetaAutocast
    try:
        yield
    finally:
        torch.autocast = _AUTOCAST


def count(build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module], torch.Tensor],
          backward: bool) -> dict[str, float]:
    """Per-sample FLOPs (forward, or forward + backward) and saved-for-backward bytes of
    ``run(build())`` on the meta device; ``run`` returns a tensor to sum for the backward."""
    model = _build_meta(build)
    params = sum(p.numel() for p in model.parameters())
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    counter = FlopCounterMode(display=False)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if backward else nullcontext()
    grad = nullcontext() if backward else torch.no_grad()
    with _meta_autocast(), counter, hooks, grad, torch.device("meta"):
        out = run(model)
        if backward:
            out.float().sum().backward()
    return {"params": float(params), "flops": counter.get_total_flops() / B, "saved_bytes": sum(saved) / B}


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of live (not yet freed) operator outputs during a forward: what a forward
    without autograd holds at its worst moment (views share their base's memory: not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t._base is None:
                n = t.numel() * t.element_size()
                self.live += n
                weakref.finalize(t, self._free, n)
        self.peak = max(self.peak, self.live)
        return out


def peak_live_bytes(build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module], torch.Tensor]) -> float:
    """Per-sample peak bytes of live activations of ``run(build())`` without autograd (meta device)."""
    model = _build_meta(build)
    mode = _LiveBytes()
    with _meta_autocast(), torch.no_grad(), mode:
        out = run(model)
        del out
    return mode.peak / B


def _x(c: int = 4, s: int = 256) -> torch.Tensor:
    return torch.rand(B, c, s, s, device="meta")


def network_costs(profile: Any) -> dict[str, dict[str, Any]]:
    """name -> {params, fwd, train (fwd+bwd), saved_bytes, shape notes} for one sample."""
    from wsss_bench.nn import amecam as am
    from wsss_bench.nn import diffusion_features as dfeat
    from wsss_bench.nn import dig as D
    from wsss_bench.nn import seam as sm
    from wsss_bench.nn.classifier import build_classifier
    from wsss_bench.nn.cldf import PixelDecoder
    from wsss_bench.nn.diffusion import build_cdm
    from wsss_bench.nn.fsl import build_fsl
    from wsss_bench.nn.noisy_classifier import build_noisy_classifier, feature_dim as enc_dim

    s, c = int(profile.image_size), 4
    t = lambda: torch.zeros(B, dtype=torch.long, device="meta")  # noqa: E731
    y = lambda: torch.ones(B, dtype=torch.long, device="meta")  # noqa: E731
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, build, run, note: str = "") -> None:
        fwd = count(build, run, backward=False)
        train = count(build, run, backward=True)
        out[name] = {"params": fwd["params"], "fwd": fwd["flops"], "train": train["flops"],
                     "saved_bytes": train["saved_bytes"], "live_bytes": peak_live_bytes(build, run), "note": note}

    def logits(m):
        r = m(_x(c, s))
        return r[0] if isinstance(r, tuple) else r

    cam = dict(profile.cam_classifier)
    add("resnet50-os32", lambda: build_classifier(cam, c), logits,
        f"CAM classifier {cam['arch']}, layer4 map {s // int(cam['output_stride'])}x{s // int(cam['output_stride'])}, "
        f"D(layer1-4) = 3840")
    t2 = dict(profile.table2_resnet)
    add("resnet18-os32", lambda: build_classifier(t2, c), logits,
        f"Table 2 {t2['arch']}, layer4 map {s // int(t2['output_stride'])}x{s // int(t2['output_stride'])}, "
        f"D(layer1-4) = 960")
    seam_spec = sm.seam_backbone_spec(profile.cam_classifier)
    add("seam", lambda: sm.build_seam(seam_spec, c),
        lambda m: (lambda r: r[0] if isinstance(r, (tuple, list)) else
                   (next(iter(r.values())) if isinstance(r, dict) else r))(m(_x(c, s))),
        "SEAM network on the CAM classifier's backbone")
    spec = dict(profile.amecam)
    sizes = am.feature_sizes(s, int(spec["output_stride"]))
    add("amecam-stage1", lambda: am.MultiExitResNet(spec, c), lambda m: m(_x(c, s))[0],
        f"ResNet-18-IN multi-exit, exit maps {'/'.join(str(v) for v in sizes)} px")
    add("amecam-simclr", lambda: am.SimCLRNet(spec, c), lambda m: m(_x(c, s)), "SimCLR stage 0, 256-d projections")
    unet = dict(profile.cdm_unet)
    add("cdm-unet", lambda: build_cdm(unet, c), lambda m: m(_x(c, s), timesteps=t(), class_labels=y()),
        "class-conditional DiffusionModelUNet, attention at the two deepest levels")
    blocks = dfeat.select_blocks(profile.cldf.feature_blocks, unet, s)
    dim = dfeat.feature_dim(unet, blocks)
    res = dfeat.up_block_resolutions(len(unet["channels"]), s)
    fwd = count(lambda: build_cdm(unet, c),
                lambda m: torch.cat([a.flatten(1).sum(1, keepdim=True) for a in
                                     dfeat.block_activations(m, _x(c, s), t(), y(), blocks)], 1), backward=False)
    live = peak_live_bytes(lambda: build_cdm(unet, c),
                           lambda m: dfeat.block_activations(m, _x(c, s), t(), y(), blocks)[0])
    out["cdm-features"] = {"params": fwd["params"], "fwd": fwd["flops"], "train": float("nan"), "saved_bytes": 0.0,
                           "live_bytes": live,
                           "note": f"CLDF features: up blocks {blocks} at {[res[i] for i in blocks]} px, D = {dim}"}
    add("noisy-classifier", lambda: build_noisy_classifier(unet, c, s), lambda m: m(_x(c, s), t()),
        f"the CDM's encoder widths, D(unet-encoder) = {enc_dim(unet)}")
    dg = dict(profile.dig)
    feat_in = len(D.FEATURE_T) * D.feature_dim(unet)
    g = int(dg["grid"])
    add("dig-vit", lambda: D.DiG(c, s, dg, feat_in),
        lambda m: (lambda r: r["cam_diff"].sum() + r["diff_cls"].sum())(
            m(_x(c, s), torch.rand(B, feat_in, g, g, device="meta"))),
        f"ViT patch {dg['patch']} depth {dg['depth']} dim {dg['dim']} + 2 LFCA; diffusion input "
        f"{feat_in} x {g} x {g} per slice ({len(D.FEATURE_T)} t x D_f {D.feature_dim(unet)})")
    add("fsl-unet", lambda: build_fsl(dict(profile.fsl), c), lambda m: m(_x(c, s)), "MONAI UNet, 2 classes")
    npix = int(profile.cldf.fg_cap) + int(profile.cldf.bg_per_batch)
    dec = count(lambda: PixelDecoder(dim), lambda m: m(torch.rand(npix * B, dim, device="meta")), backward=True)
    out["cldf-decoder"] = {"params": dec["params"], "fwd": float("nan"), "train": dec["flops"],
                           "saved_bytes": dec["saved_bytes"], "live_bytes": 0.0,
                           "note": f"pixel MLP {dim} -> 16 x 3 -> 16 on <= {npix} sampled pixels per batch"}
    out["_meta"] = {"cldf_dim": dim, "dig_feat_in": feat_in, "enc_dim": enc_dim(unet)}
    return out
