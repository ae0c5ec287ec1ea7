"""SEAM (Wang et al. 2020, "Self-supervised Equivariant Attention Mechanism"), docs/methods/seam.md.

Adapted to one foreground class and 4-channel (BraTS) / 1-channel (FLARE) slices.

Network (:class:`SEAMNet`):

- backbone: the profile's CAM-classifier architecture (``cam_classifier``: a timm ResNet
  with its stage widths), always at output stride 8, built with ``features_only`` so that
  stage 2 (``layer2``), stage 3 (``layer3``) and the last stage (``layer4``) are exposed;
  all three are on the same S/8 grid;
- CAM head: Dropout2d(0.5) -> Conv1x1(C_last -> 2, no bias); channel 0 background, 1 foreground;
- pixel correlation module (PCM), on the CAM grid h x w:

      cam_d  = ReLU(cam) / (max_hw ReLU(cam) + 1e-5)      detached; cam_d[bg] := 1 - cam_d[fg]
      f      = concat[ x resized to h x w (align_corners=True),
                       ReLU(Conv1x1(stage-2.detach() -> 64)), ReLU(Conv1x1(stage-3.detach() -> 128)) ]
      f      = Conv1x1(C + 192 -> 192, no bias)(f);  f <- f / (||f||_2 + 1e-5)   per pixel
      aff    = ReLU(f^T f)  (hw x hw);  aff <- aff / (column sums + 1e-5)
      cam_rv = cam_d @ aff                                  (2, hw) @ (hw, hw)

  ``cam`` and ``cam_rv`` are returned upsampled to the input size (align_corners=True).
  Because the CAM and the backbone features enter the PCM detached, a loss on cam_rv
  trains only the PCM convolutions, never the backbone or the CAM head.

Losses (:func:`seam_losses`) on two views, I and I^ = A(I) with A = bilinear rescale by
``view_scale`` (align_corners=True), followed on BraTS by a left-right flip; label vector
l = [1, y]:

    L_cls = 1/2 sum_v BCE(GAP(cam_v)_fg, y) + 1/2 sum_v rvmin(cam_rv_v . l)
    L_ER  = mean | A(max_norm(cam(I)) . l)_fg - (max_norm(cam(I^)) . l)_fg |
    L_ECR = topk-mean |A(cam(I))* - A(cam_rv(I))| ... (see :func:`ecr_loss`), k = 20% of 2 h w
    L     = L_cls + L_ER + L_ECR

Training (:func:`train_seam`): SGD momentum 0.9, lr 0.01, weight decay 5e-4, poly decay
(power 0.9) over all iterations; new layers (head, PCM) 10x, their biases 20x without
weight decay; backbone biases 2x without weight decay [reference code]; batch and epochs
from the profile's ``seam`` section; per batch a scale jitter in [0.9, 1.1] and a random
S x S crop (zero padding when smaller), per image a random flip on BraTS.  Written as a
resumable loop: every random number of iteration ``it`` (batch order, jitter, crop, flips,
Dropout2d masks) derives from (seed, it), so a killed run resumes bit-identically on CPU.

Inference (:func:`seam_maps`): the foreground channel of cam_rv at every TTA scale (x flip
on BraTS), each Up'd to S x S (align_corners=False) and flipped back, summed, ReLU, minmax.

Importing this module imports neither torch nor timm.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from wsss_bench._compat import import_timm
from wsss_bench.errors import PluginError
from wsss_bench.lazy import F, np, torch
from wsss_bench.maps import minmax
from wsss_bench.nn.training import (Criterion, IterationBatches, auc_and_loss, iteration_generator, rule_from_profile,
                                    run_resumable)

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    Tensor = _torch.Tensor

#: training recipe [reference code: YudeWang/SEAM train_SEAM.py]
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
POLY_POWER = 0.9
NEW_LR_MULT = 10.0
NEW_BIAS_LR_MULT = 20.0
BACKBONE_BIAS_LR_MULT = 2.0
#: scale jitter range [inferred; the reference's RandomResizeLong(448, 768) is image-size specific]
JITTER = (0.9, 1.1)
#: ECR keeps the largest 20% of the 2 h w differences; rvmin the lowest 25% [reference code]
ECR_TOPK = 0.2
RVMIN_FRACTION = 0.25
EPS = 1e-5
#: the PCM's feature widths [reference code]
PCM_STAGE2, PCM_STAGE3, PCM_DIM = 64, 128, 192
#: a CAM grid smaller than this breaks the PCM / BatchNorm statistics of a view
MIN_GRID = 2
OUTPUT_STRIDE = 8

RECIPE = {
    "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "poly_power": POLY_POWER,
    "new_lr_mult": NEW_LR_MULT, "new_bias_lr_mult": NEW_BIAS_LR_MULT,
    "backbone_bias_lr_mult": BACKBONE_BIAS_LR_MULT, "jitter": list(JITTER), "ecr_topk": ECR_TOPK,
    "rvmin_fraction": RVMIN_FRACTION, "output_stride": OUTPUT_STRIDE,
}


# ============================================================================ the network
def _seam_net_class():
    nn = torch.nn

    class SEAMNet(nn.Module):
        """Backbone + CAM head + PCM; ``forward(x)`` -> (cam, cam_rv), both (B, 2, H, W)."""

        def __init__(self, spec: Mapping[str, Any], in_chans: int) -> None:
            super().__init__()

            timm = import_timm()
            kwargs: dict[str, Any] = dict(pretrained=False, in_chans=int(in_chans), features_only=True,
                                          out_indices=(2, 3, 4), output_stride=OUTPUT_STRIDE)
            channels = list(spec.get("channels") or [])
            if channels:
                kwargs["channels"] = tuple(int(c) for c in channels)
            self.in_chans = int(in_chans)
            self.backbone = timm.create_model(spec["arch"], **kwargs)
            c2, c3, c_last = self.backbone.feature_info.channels()
            self.dropout = nn.Dropout2d(0.5)
            self.head = nn.Conv2d(c_last, 2, 1, bias=False)  # channel 0 bg, 1 fg
            self.pcm_stage2 = nn.Conv2d(c2, PCM_STAGE2, 1, bias=False)
            self.pcm_stage3 = nn.Conv2d(c3, PCM_STAGE3, 1, bias=False)
            self.pcm_proj = nn.Conv2d(self.in_chans + PCM_STAGE2 + PCM_STAGE3, PCM_DIM, 1, bias=False)
            # initialisation of the new layers [reference code]
            nn.init.xavier_uniform_(self.head.weight)
            nn.init.kaiming_normal_(self.pcm_stage2.weight)
            nn.init.kaiming_normal_(self.pcm_stage3.weight)
            nn.init.xavier_uniform_(self.pcm_proj.weight, gain=4)

        def new_layers(self) -> list:
            """The layers trained from scratch in the reference (lr 10x, biases 20x)."""
            return [self.head, self.pcm_stage2, self.pcm_stage3, self.pcm_proj]

        def features(self, x: "Tensor") -> tuple["Tensor", "Tensor", "Tensor"]:
            s2, s3, last = self.backbone(x)  # (B, c2, h, w), (B, c3, h, w), (B, c_last, h, w)
            return s2, s3, last

        def cam_grid(self, x: "Tensor") -> tuple["Tensor", "Tensor"]:
            """(cam, cam_rv) on the CAM grid, (B, 2, h, w) each."""
            s2, s3, last = self.features(x)
            cam = self.head(self.dropout(last))  # (B, 2, h, w)
            h, w = cam.shape[-2:]
            cam_d = normalised_cam(cam)
            f = torch.cat([
                F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True),
                F.relu(self.pcm_stage2(s2.detach())),
                F.relu(self.pcm_stage3(s3.detach())),
            ], dim=1)  # (B, C + 192, h, w)
            return cam, self.pcm(cam_d, f)

        def pcm(self, cam_d: "Tensor", f: "Tensor") -> "Tensor":
            """cam_rv = cam_d @ aff with aff from the projected features ``f`` (B, C+192, h, w)."""
            return propagate(cam_d, self.pcm_proj(f))

        def forward(self, x: "Tensor") -> tuple["Tensor", "Tensor"]:
            cam, cam_rv = self.cam_grid(x)
            size = tuple(x.shape[-2:])
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=True)
            cam_rv = F.interpolate(cam_rv, size=size, mode="bilinear", align_corners=True)
            return cam, cam_rv  # (B, 2, H, W) each

    return SEAMNet


_NET = None


def seam_net_class():
    global _NET
    if _NET is None:
        _NET = _seam_net_class()
    return _NET


def seam_backbone_spec(cam_classifier: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone spec: the CAM-classifier architecture and widths at output stride 8."""
    return {"arch": str(cam_classifier["arch"]), "channels": [int(c) for c in (cam_classifier.get("channels") or [])],
            "output_stride": OUTPUT_STRIDE}


def build_seam(spec: Mapping[str, Any], in_chans: int, seed: int | None = None):
    """A randomly initialised :class:`SEAMNet`; ``seed`` leaves the global RNG untouched."""
    cls = seam_net_class()
    if seed is None:
        return cls(spec, in_chans)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2**63))
        return cls(spec, in_chans)


# ============================================================================ PCM pieces
def normalised_cam(cam: "Tensor") -> "Tensor":
    """cam_d: ReLU(cam)/(per-channel max + 1e-5) on the detached CAM, bg := 1 - fg. (B, 2, h, w)."""
    with torch.no_grad():
        c = F.relu(cam.detach().float())
        peak = c.flatten(2).amax(dim=2)[:, :, None, None] + EPS  # (B, 2, 1, 1)
        fg = c[:, 1:2] / peak[:, 1:2]
        return torch.cat([1.0 - fg, fg], dim=1)


def propagate(cam_d: "Tensor", f: "Tensor") -> "Tensor":
    """PCM propagation: cam_d (B, K, h, w), projected features f (B, D, h, w) -> cam_rv (B, K, h, w)."""
    b, k, h, w = cam_d.shape
    with torch.autocast(device_type=f.device.type, enabled=False):  # affinities in float32 (or float64)
        dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        f = f.to(dtype).flatten(2)  # (B, D, hw)
        f = f / (f.norm(dim=1, keepdim=True) + EPS)
        aff = F.relu(f.transpose(1, 2) @ f)  # (B, hw, hw)
        aff = aff / (aff.sum(dim=1, keepdim=True) + EPS)  # divided by its column sums
        return (cam_d.to(dtype).flatten(2) @ aff).view(b, k, h, w)


# ============================================================================ losses
def max_norm(p: "Tensor") -> "Tensor":
    """ReLU(p - min - 1e-5)/(max - min + 1e-5) per image and channel, after ReLU(p) [reference code]."""
    p = F.relu(p)
    flat = p.flatten(2)
    lo = flat.amin(dim=2)[:, :, None, None]
    hi = flat.amax(dim=2)[:, :, None, None]
    return F.relu(p - lo - EPS) / (hi - lo + EPS)


def view_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """Size of the rescaled view: floor(n * scale), as ``F.interpolate(scale_factor=...)``."""
    return tuple(int(math.floor(int(n) * float(scale))) for n in size)


def to_view(t: "Tensor", size: Sequence[int], flip: bool) -> "Tensor":
    """A: bilinear resize to the second view's grid (align_corners=True), then flip on BraTS."""
    t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=True)
    return t.flip(-1) if flip else t


def with_background(fg: "Tensor") -> "Tensor":
    """(B, 1, h, w) foreground -> (B, 2, h, w) with background := 1 - foreground."""
    return torch.cat([1.0 - fg, fg], dim=1)


def cls_loss(cam1, cam_rv1, cam2, cam_rv2, y: "Tensor") -> "Tensor":
    """L_cls = 1/2 sum_v BCE(GAP(cam_v)_fg, y) + 1/2 sum_v rvmin_v; maps at their view's input size."""
    y = y.to(cam1.dtype)
    bce = sum(F.binary_cross_entropy_with_logits(c[:, 1].mean(dim=(1, 2)), y) for c in (cam1, cam2))
    label = y[:, None, None]
    rvmin = sum(rvmin_loss(r[:, 1] * label) for r in (cam_rv1, cam_rv2))
    return bce / 2 + rvmin / 2


def rvmin_loss(fg: "Tensor") -> "Tensor":
    """Mean of ReLU of the lowest 25% values of each image's (label-masked) cam_rv fg (B, H, W)."""
    flat = fg.flatten(1)  # (B, HW)
    k = max(1, int(flat.shape[1] * RVMIN_FRACTION))
    low = torch.topk(flat, k=k, dim=1, largest=False).values
    return F.relu(low).mean()


def er_loss(cam1: "Tensor", cam2: "Tensor", y: "Tensor", flip: bool) -> "Tensor":
    """L_ER = mean |A(max_norm(cam(I)) . l)_fg - (max_norm(cam(I^)) . l)_fg| on I^'s grid."""
    label = y.float()[:, None, None, None]
    a = to_view(max_norm(cam1)[:, 1:2], cam2.shape[-2:], flip) * label
    b = max_norm(cam2)[:, 1:2] * label
    return (a - b).abs().mean()


def ecr_loss(cam1, cam_rv1, cam2, cam_rv2, y: "Tensor", flip: bool) -> "Tensor":
    """L_ECR = topk-mean|cam(I^)* - A(cam_rv(I))| + topk-mean|A(cam(I))* - cam_rv(I^)|.

    All four maps are max_norm(.) . l on I^'s grid; * = detached with background := 1 - fg;
    k = 20% of 2 h w per image; the mean runs over the batch's top-k values.
    """
    size = cam2.shape[-2:]
    label = torch.stack([torch.ones_like(y.float()), y.float()], dim=1)[:, :, None, None]  # (B, 2, 1, 1)
    c1 = with_background(to_view(max_norm(cam1)[:, 1:2], size, flip) * label[:, 1:]).detach()
    c2 = with_background(max_norm(cam2)[:, 1:2] * label[:, 1:]).detach()
    r1 = to_view(max_norm(cam_rv1), size, flip) * label
    r2 = max_norm(cam_rv2) * label
    k = max(1, int(2 * size[0] * size[1] * ECR_TOPK))

    def topk_mean(t):
        return torch.topk(t.flatten(1), k=k, dim=1).values.mean()

    return topk_mean((c2 - r1).abs()) + topk_mean((c1 - r2).abs())


def seam_losses(model, x: "Tensor", y: "Tensor", view_scale: float, flip: bool,
                autocast: Any = None) -> dict[str, "Tensor"]:
    """All SEAM losses for a batch ``x`` (B, C, S, S) with labels ``y`` (B,)."""
    size2 = view_size(x.shape[-2:], view_scale)
    x2 = to_view(x, size2, flip)  # (B, C, s, s)
    with autocast if autocast is not None else contextlib.nullcontext():
        cam1, cam_rv1 = model(x)
        cam2, cam_rv2 = model(x2)
    cam1, cam_rv1, cam2, cam_rv2 = (t.float() for t in (cam1, cam_rv1, cam2, cam_rv2))
    l_cls = cls_loss(cam1, cam_rv1, cam2, cam_rv2, y)
    l_er = er_loss(cam1, cam2, y, flip)
    l_ecr = ecr_loss(cam1, cam_rv1, cam2, cam_rv2, y, flip)
    return {"loss": l_cls + l_er + l_ecr, "cls": l_cls, "er": l_er, "ecr": l_ecr}


# ============================================================================ geometry check
def cam_grid_size(model, in_chans: int, n: int) -> tuple[int, int]:
    """The CAM grid of an n x n input (one zero image through the backbone, no autograd)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            out = model.features(torch.zeros(1, in_chans, n, n, device=p.device, dtype=p.dtype))[-1]
    finally:
        model.train(was)
    return int(out.shape[-2]), int(out.shape[-1])


def check_geometry(model, in_chans: int, image_size: int, view_scale: float,
                   tta_scales: Sequence[float], owner: str = "cam plugin 'seam'") -> dict[str, Any]:
    """Raise PluginError (naming the profile value) when a view's CAM grid is below 2 x 2.

    Checks the second training view (``seam.view_scale``), the smallest jittered crop (always
    S x S) and every TTA scale (``seam.tta_scales``).  Returns the grid sizes for the manifest.
    """
    s = int(image_size)
    if not float(view_scale) > 0:
        raise PluginError(f"{owner}: profile value seam.view_scale={view_scale!r} must be > 0 "
                          "(SEAM's second view is the image rescaled by it; the paper uses 0.3)")
    checks = [("seam.view_scale", float(view_scale))] + [("seam.tta_scales", float(t)) for t in tta_scales]
    if not tta_scales:
        raise PluginError(f"{owner}: profile value seam.tta_scales is empty; give at least one scale, e.g. [1.0]")
    grids: dict[str, Any] = {"image": list(cam_grid_size(model, in_chans, s))}
    for name, scale in checks:
        if not scale > 0:
            raise PluginError(f"{owner}: profile value {name} holds {scale!r}; scales must be > 0")
        n = view_size((s,), scale)[0] if name == "seam.view_scale" else int(round(s * scale))
        grid = cam_grid_size(model, in_chans, n) if n >= 1 else (0, 0)
        if min(grid) < MIN_GRID:
            need = MIN_GRID * OUTPUT_STRIDE - OUTPUT_STRIDE + 1
            what = f"{name}={scale:g}" if name == "seam.view_scale" else f"{name} contains {scale:g}, which"
            raise PluginError(
                f"{owner}: profile value {what} makes a {n}x{n} px view of the {s} px image whose CAM grid "
                f"is {grid[0]}x{grid[1]} (output stride {OUTPUT_STRIDE}); the PCM and the view's BatchNorm "
                f"need at least {MIN_GRID}x{MIN_GRID}, i.e. a view of >= {need} px: raise {name} to "
                f">= {math.ceil(need / s * 1000) / 1000:g} or use a profile with a larger image_size")
        grids[f"{name}={scale:g}"] = [n, *grid]
    return grids


# ============================================================================ training
def parameter_groups(model) -> list[dict[str, Any]]:
    """SGD groups: backbone weights 1x (wd), backbone biases 2x (no wd), new weights 10x (wd), new biases 20x (no wd)."""
    new_ids = {id(p) for m in model.new_layers() for p in m.parameters()}
    groups = {"backbone": [], "backbone_bias": [], "new": [], "new_bias": []}
    for name, p in model.named_parameters():
        is_bias = name.endswith(".bias")
        key = ("new" if id(p) in new_ids else "backbone") + ("_bias" if is_bias else "")
        groups[key].append(p)
    spec = {"backbone": (1.0, WEIGHT_DECAY), "backbone_bias": (BACKBONE_BIAS_LR_MULT, 0.0),
            "new": (NEW_LR_MULT, WEIGHT_DECAY), "new_bias": (NEW_BIAS_LR_MULT, 0.0)}
    return [{"params": ps, "lr": LR * spec[k][0], "initial_lr": LR * spec[k][0], "weight_decay": spec[k][1],
             "name": k} for k, ps in groups.items() if ps]


def poly_factor(it: int, total: int) -> float:
    """(1 - it/total)^0.9, the reference's PolyOptimizer at global step ``it``."""
    return (1.0 - min(int(it), int(total)) / max(1, int(total))) ** POLY_POWER


def augment(x: "Tensor", g: "_torch.Generator", flips: bool) -> "Tensor":
    """Scale jitter in [0.9, 1.1] (one factor per batch), a random S x S crop or zero-padded
    placement per image, and a left-right flip per image with probability 1/2 when ``flips``."""
    b, c, h, w = x.shape
    scale = JITTER[0] + (JITTER[1] - JITTER[0]) * float(torch.rand((), generator=g))
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    offsets = torch.rand((b, 2), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    out = x.new_zeros(b, c, h, w)
    for i in range(b):
        oy = int(offsets[i, 0] * (abs(nh - h) + 1))
        ox = int(offsets[i, 1] * (abs(nw - w) + 1))
        oy, ox = min(oy, abs(nh - h)), min(ox, abs(nw - w))
        # bigger: crop at (oy, ox); smaller: place at (oy, ox) in a zero canvas
        src_y, dst_y = (oy, 0) if nh >= h else (0, oy)
        src_x, dst_x = (ox, 0) if nw >= w else (0, ox)
        hh, ww = min(h, nh), min(w, nw)
        out[i, :, dst_y:dst_y + hh, dst_x:dst_x + ww] = x[i, :, src_y:src_y + hh, src_x:src_x + ww]
    if flips:
        out = torch.where(flip.to(out.device)[:, None, None, None], out.flip(-1), out)
    return out


def seam_iterations(n_train: int, cfg: Any) -> int:
    """epochs x full batches per epoch (a partial last batch is dropped, as in the reference)."""
    return int(cfg.epochs) * max(1, int(n_train) // int(cfg.batch))


def train_seam(model, data: Any, profile: Any, device: Any, seed: int, work: Path, flips: bool,
               bf16: bool = False, progress: Callable[[int], Any] | None = None,
               iterations: int | None = None, checkpoint_interval: int | None = None,
               step_hook: Callable[[int], Any] | None = None) -> tuple[dict[str, "Tensor"], dict[str, Any]]:
    """Train ``model`` with the SEAM losses on ``data``'s train split; returns (weights, info).

    ``flips`` (BraTS) turns on flip augmentation and the flip of the second view.  Every
    random number of iteration ``it`` comes from ``iteration_generator(seed, it)`` (the
    Dropout2d masks from a CPU/GPU RNG seeded from it), so a resumed run is bit-identical on
    CPU.  ``step_hook(it)`` runs before each step (tests use it to simulate a kill).

    The epochs are a step cap: the convergence rule scores the classification head on the
    validation split every ``seam.eval_every`` steps (AUC of sigma(GAP(cam_fg)), the logit
    L_cls trains; tie-break its BCE), keeps the best weights and stops on a plateau.
    """
    cfg = profile.seam
    view_scale = float(cfg.view_scale)
    dev = torch.device(device)
    model.to(dev)
    geometry = check_geometry(model, model.in_chans, int(data.image_size), view_scale, list(cfg.tta_scales))
    batches = IterationBatches(data, data.split("train"), int(cfg.batch), seed, dev)
    total = int(iterations if iterations is not None else seam_iterations(len(batches.idx), cfg))
    groups = parameter_groups(model)
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    parts: dict[str, list[float]] = {"cls": [], "er": [], "ecr": []}
    rng_devices = [dev] if dev.type == "cuda" else []

    def step(it: int) -> float:
        if step_hook is not None:
            step_hook(it)
        factor = poly_factor(it, total)
        for grp in opt.param_groups:
            grp["lr"] = grp["initial_lr"] * factor
        b = batches.get(it)
        g = iteration_generator(seed, it)
        x = augment(b.images.float(), g, flips).to(dev)  # (B, C, S, S)
        y = b.labels.to(dev).long()
        drop_seed = int(torch.randint(0, 2**62, (), generator=g))
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(drop_seed)  # Dropout2d masks of this iteration
            autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else None
            losses = seam_losses(model, x, y, view_scale, flips, autocast)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
        for k in parts:
            parts[k].append(float(losses[k].detach()))
        return float(losses["loss"].detach())

    val_idx = np.asarray(data.split("val"))

    def evaluate(m) -> tuple[float | None, float | None]:
        p, y = [], []
        for b in data.batches(val_idx, int(cfg.batch), shuffle=False, device=str(dev)):
            with (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
                cam, _ = m(b.images.to(dev).float())
            p.append(torch.sigmoid(cam[:, 1].float().mean(dim=(1, 2))).cpu())
            y.append(b.labels.cpu())
        if not p:
            return None, None
        return auc_and_loss(torch.cat(y).numpy(), torch.cat(p).numpy())

    criterion = Criterion("val AUC of the classification head sigma(GAP(cam_fg)); tie-break its BCE", evaluate)
    rule = rule_from_profile(profile, cfg, "score", default_every=batches.per_epoch)
    t0 = time.perf_counter()
    weights, info = run_resumable(work, model, opt, total, step, 0.0, progress, every=checkpoint_interval,
                                  criterion=criterion, rule=rule)
    info.update(
        batch=int(cfg.batch), epochs=int(cfg.epochs), view_scale=view_scale, flips=bool(flips), bf16=bool(bf16),
        n_train=int(len(batches.idx)), recipe=dict(RECIPE), geometry=geometry,
        last_losses={k: (v[-1] if v else None) for k, v in parts.items()},
        mean_losses_this_attempt={k: (float(np.mean(v)) if v else None) for k, v in parts.items()},
        seconds=round(time.perf_counter() - t0, 2),
    )
    return weights, info


# ============================================================================ inference
def seam_maps(model, images: "Tensor", tta_scales: Sequence[float], flips: bool,
              autocast: Callable[[], Any] | None = None) -> "Tensor":
    """SEAM's map for ``images`` (B, C, S, S): sum over scales (x flip) of the Up'd cam_rv fg, ReLU, minmax.

    ``autocast`` is a factory of the context each forward runs in (``ctx.autocast``).
    """
    autocast = autocast or contextlib.nullcontext

    size = tuple(images.shape[-2:])
    total = torch.zeros(images.shape[0], *size, device=images.device)
    with torch.no_grad():
        for scale in tta_scales:
            n = tuple(max(1, int(round(s * float(scale)))) for s in size)
            x = images if n == size else F.interpolate(images, size=n, mode="bilinear", align_corners=False)
            for flip in ((False, True) if flips else (False,)):
                xi = x.flip(-1) if flip else x
                with autocast():
                    _, cam_rv = model(xi)
                fg = cam_rv[:, 1:2].float()
                if fg.shape[-2:] != size:
                    fg = F.interpolate(fg, size=size, mode="bilinear", align_corners=False)
                if flip:
                    fg = fg.flip(-1)
                total += fg[:, 0]
    return minmax(F.relu(total))


def background_remap(m: "Tensor", bg: float) -> "Tensor":
    """Monotone piecewise-linear map of [0, 1] onto itself sending ``bg`` to 0.5.

    With it, the protocol's rule minmax(map) > 0.5 keeps exactly the pixels whose SEAM map
    exceeds ``bg`` (the reference's argmax against a constant background score, e.g. 0.26).
    """
    low = m / (2.0 * bg)
    high = 0.5 + (m - bg) / (2.0 * (1.0 - bg))
    return torch.where(m <= bg, low, high).clamp(0.0, 1.0)
