"""AME-CAM (Chen et al. 2023), docs/methods/amecam.md: networks, losses and the three trainings.

Stage 1, the **multi-exit classifier**.  A ResNet-18 whose every BatchNorm is an
``InstanceNorm2d(affine=False)`` (timm, ``pretrained=False``, widths and output stride from
the profile's ``amecam`` section).  Exit k is a 1x1 convolution with bias on the output of
``layer_k`` (C_k = 64, 128, 256, 512 at full width):

    M_k = e_k(layer_k(x))                 (B, 1, h_k, w_k)
    logit_k = mean_{h, w} M_k             (B,)
    m_k = Up(M_k)                         (B, S, S), bilinear, align_corners=False
    L1 = sum_k w_k BCEWithLogits(logit_k, y),   w = (0.25, 0.5, 0.75, 1.0)

Adam lr 1e-4, weight decay 1e-5, cosine to 5e-6 over the step cap; no augmentation; the
convergence rule scores the validation AUC of sigma(logit_4) (tie-break: its BCE), keeps the
best weights and stops on a plateau.

Stage 0, **SimCLR pre-training** of the same encoder (paper profile only): two views per
slice (RandomResizedCrop(S), left-right flip on BraTS, per-channel brightness/contrast
jitter of strength 0.8 with p = 0.8), head Linear(C_4, C_4, no bias) -> ReLU ->
Linear(C_4, 256), L2-normalised projections, NT-Xent at temperature 0.07; SGD lr 1e-3,
weight decay 1e-5, cosine.  The encoder goes into stage 1 by parameter name.

Stage 2, the **attention aggregation** (stage 1 frozen, in eval; labels unused):

    gray = mean_c x                       (B, 1, S, S)
    n_k  = (m_k - min + 1e-5) / (max - min + 1e-5)      per image and exit
    u    = gray * n                       (B, 4, S, S)
    w    = softmax_k(att(u))              4 x [Conv3x3 -> BN -> ReLU], 4 -> 32 -> 32 -> 32 -> 4
    A    = sum_k w_k m_k                  on the raw maps
    fg   = flatten(gray * A),  bg = flatten(gray * (1 - A))
    L2   = SimMax(fg) + SimMin(fg, bg) + SimMax(bg)                 (C^2AM)

with S(X, Y)_ij = clamp(cos(X_i, Y_j), 5e-4, 0.9995), SimMax(X) = mean_ij -log S(X, X)_ij *
exp(-0.25 (r_ij - 1)) (r_ij the 0-based descending rank of S_ij in row i) and SimMin(F, B) =
mean_ij -log(1 - S(B, F)_ij).  Adam lr 1e-4, weight decay 1e-5, cosine to 5e-6 over the step
cap; the convergence rule scores L2 on the validation split (lower is better).

**Final map**: avg = mean(m_1, m_2, m_3, m_4, A); cam = minmax(s * avg), where the polarity
s is chosen by the deletion test (:func:`polarity_test`), never by a blind inversion.

All three trainings run through :func:`wsss_bench.nn.training.run_resumable` with a
checkpoint after every epoch (or every ``every`` iterations), so a killed build resumes
from its last checkpoint and ends bit-identical (CPU).  Shapes in comments.
This module imports torch; plugin modules import it from ``prepare`` only.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss_bench._compat import import_timm
from wsss_bench.maps import minmax, upsample
from wsss_bench.nn.training import (ConvergenceRule, Criterion, IterationBatches, auc_and_loss, iteration_generator,
                                    rule_from_profile, run_resumable)

# ---------------------------------------------------------------------------- recipe constants
#: exit-loss weights, shallow to deep [reference code]
EXIT_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
#: stage 1 and 2 optimiser [reference code]
LR, WEIGHT_DECAY, LR_MIN = 1e-4, 1e-5, 5e-6
#: stage 0 (SimCLR) [reference code]
SIMCLR_LR, SIMCLR_WEIGHT_DECAY, SIMCLR_TEMPERATURE, SIMCLR_DIM = 1e-3, 1e-5, 0.07, 256
#: stage 0 batch = SIMCLR_BATCH_FACTOR x the profile's batch (512 = 2 x 256 on the paper profile)
SIMCLR_BATCH_FACTOR = 2
#: RandomResizedCrop's (torchvision default) area and aspect-ratio ranges
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
#: brightness/contrast jitter strength and probability [reference code; per channel inferred]
JITTER, JITTER_P = 0.8, 0.8
#: C^2AM similarity clamp and rank decay [reference code]
SIM_CLAMP, RANK_ALPHA = (5e-4, 0.9995), 0.25
#: n_k's epsilon [reference code]
NORM_EPS = 1e-5
#: attention net width [reference code]
ATT_WIDTH = 32
#: polarity rule [inferred]: slices, tie margin
POLARITY_SLICES, POLARITY_TIE = 256, 0.01
#: ResNet-18 stage widths at full width
FULL_WIDTHS = (64, 128, 256, 512)
OUTPUT_STRIDES = (8, 16, 32)
#: SimMax needs at least this many images per batch (one image has only its diagonal)
MIN_BATCH = 4


# ============================================================================ geometry
def widths(spec: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """Stage widths C_1..C_4 of a profile's ``amecam`` section ([] = full width)."""
    ch = tuple(int(c) for c in (spec.get("channels") or []))
    return ch if ch else FULL_WIDTHS  # type: ignore[return-value]


def _halve(n: int) -> int:
    """Output size of a stride-2 layer with 'same' padding (conv 7/3 or 3x3 max-pool): ceil(n/2)."""
    return (int(n) + 1) // 2


def feature_sizes(image_size: int, output_stride: int) -> list[int]:
    """Spatial size of layer1..layer4 for an S x S input (stem /4, then /2 until the stride)."""
    n = _halve(_halve(image_size))  # conv1 stride 2, max-pool stride 2: layer1 at S/4
    sizes, stride = [n], 4
    for _ in range(3):
        if stride < int(output_stride):  # a strided stage; beyond the output stride timm dilates
            n, stride = _halve(n), stride * 2
        sizes.append(n)
    return sizes


def geometry_problems(image_size: int, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(profile key, why) for every value of ``spec`` the networks cannot run with."""
    out: list[tuple[str, str]] = []
    os_ = int(spec.get("output_stride", 32))
    if os_ not in OUTPUT_STRIDES:
        out.append(("output_stride", f"must be one of {', '.join(map(str, OUTPUT_STRIDES))} "
                                     f"(timm ResNet), got {os_}"))
        return out
    ch = list(spec.get("channels") or [])
    if ch and (len(ch) != 4 or any(int(c) < 1 for c in ch)):
        out.append(("channels", f"must be 4 positive stage widths (or [] for full width), got {ch}"))
    deepest = feature_sizes(image_size, os_)[-1]
    if deepest < 2:
        need = 2 * os_
        out.append(("output_stride", f"= {os_} with image_size {image_size} leaves a {deepest}x{deepest} "
                                     f"deepest feature map; InstanceNorm cannot normalise a 1x1 map "
                                     f"(docs/methods/amecam.md pitfall): use image_size >= {need} or a smaller "
                                     f"output_stride (e.g. 8)"))
    if int(spec.get("batch", MIN_BATCH)) < MIN_BATCH:
        out.append(("batch", f"= {int(spec['batch'])} is below {MIN_BATCH}: SimMax ranks the similarities of "
                             f"a batch, so stage 2 needs at least {MIN_BATCH} images per batch"))
    for key in ("simclr_epochs", "stage1_epochs", "stage2_epochs"):
        if key in spec and int(spec[key]) < (0 if key == "simclr_epochs" else 1):
            out.append((key, f"= {spec[key]} must be >= {0 if key == 'simclr_epochs' else 1}"))
    return out


# ============================================================================ networks
def build_encoder(spec: Mapping[str, Any], in_chans: int) -> nn.Module:
    """timm ResNet-18 with InstanceNorm2d(affine=False) for every BatchNorm, no head, no pool."""
    timm = import_timm()
    kwargs: dict[str, Any] = dict(pretrained=False, in_chans=int(in_chans), num_classes=0, global_pool="",
                                  norm_layer=nn.InstanceNorm2d, output_stride=int(spec.get("output_stride", 32)))
    if spec.get("channels"):
        kwargs["channels"] = widths(spec)
    return timm.create_model("resnet18", **kwargs)


def encoder_layers(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of layer1..layer4 of a timm ResNet, [(B, C_k, h_k, w_k)] * 4."""
    h = encoder.maxpool(encoder.act1(encoder.bn1(encoder.conv1(x))))
    feats = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        h = getattr(encoder, name)(h)
        feats.append(h)
    return feats


class MultiExitResNet(nn.Module):
    """Stage 1: the ResNet-18-IN encoder and its four 1x1-convolution exits."""

    def __init__(self, spec: Mapping[str, Any], in_chans: int) -> None:
        super().__init__()
        self.encoder = build_encoder(spec, in_chans)
        self.exits = nn.ModuleList([nn.Conv2d(c, 1, kernel_size=1, bias=True) for c in widths(spec)])

    def exit_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw exit maps M_k, [(B, 1, h_k, w_k)] * 4."""
        return [e(f) for e, f in zip(self.exits, encoder_layers(self.encoder, x))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits (B, 4): logit_k = spatial mean of M_k, [M_k (B, 1, h_k, w_k)])."""
        maps = self.exit_maps(x)
        logits = torch.stack([m.mean(dim=(-2, -1))[:, 0] for m in maps], dim=1)  # (B, 4)
        return logits, maps

    def up_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, 4), m (B, 4, S, S) = Up(M_k) at the input size)."""
        logits, maps = self(x)
        size = tuple(x.shape[-2:])
        m = torch.cat([upsample(mk.float(), size) for mk in maps], dim=1)  # (B, 4, S, S)
        return logits.float(), m


class SimCLRNet(nn.Module):
    """Stage 0: the same encoder (same parameter names) with the projection head."""

    def __init__(self, spec: Mapping[str, Any], in_chans: int) -> None:
        super().__init__()
        self.encoder = build_encoder(spec, in_chans)
        c4 = widths(spec)[-1]
        self.head = nn.Sequential(nn.Linear(c4, c4, bias=False), nn.ReLU(inplace=True), nn.Linear(c4, SIMCLR_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised projections (B, 256) of the pooled layer4 features."""
        h = encoder_layers(self.encoder, x)[-1].mean(dim=(-2, -1))  # (B, C_4)
        return F.normalize(self.head(h).float(), dim=1)


def normalise_maps(m: torch.Tensor) -> torch.Tensor:
    """n_k = (m_k - min + 1e-5) / (max - min + 1e-5) per image and exit; m (B, K, S, S)."""
    flat = m.flatten(2)  # (B, K, S*S)
    lo, hi = flat.amin(dim=2, keepdim=True), flat.amax(dim=2, keepdim=True)
    return ((flat - lo + NORM_EPS) / (hi - lo + NORM_EPS)).reshape(m.shape)


def gray_of(x: torch.Tensor) -> torch.Tensor:
    """Channel mean, (B, 1, S, S)."""
    return x.mean(dim=1, keepdim=True)


class AttentionAggregator(nn.Module):
    """Stage 2: per-pixel softmax weights over the four exit maps."""

    def __init__(self, n_maps: int = 4, width: int = ATT_WIDTH) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = [n_maps, width, width, width, n_maps]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.att = nn.Sequential(*layers)

    def weights(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """w (B, 4, S, S), softmax over the exits of att(gray * n)."""
        u = gray_of(x) * normalise_maps(m)  # (B, 4, S, S)
        return F.softmax(self.att(u).float(), dim=1)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (B, S, S) = sum_k w_k m_k on the raw maps, w (B, 4, S, S))."""
        w = self.weights(x, m)
        return (w * m).sum(dim=1), w


def fg_bg(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fg = flatten(gray * A), bg = flatten(gray * (1 - A)); both (B, S*S)."""
    gray = gray_of(x)[:, 0].float()  # (B, S, S)
    return (gray * a).flatten(1), (gray * (1.0 - a)).flatten(1)


def average_map(m: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """avg = mean(m_1, m_2, m_3, m_4, A), (B, S, S)."""
    return torch.cat([m, a[:, None]], dim=1).mean(dim=1)


class AmeCamNet(nn.Module):
    """The trained stages together: avg map and the final CAM of a batch."""

    def __init__(self, stage1: MultiExitResNet, stage2: AttentionAggregator) -> None:
        super().__init__()
        self.stage1, self.stage2 = stage1, stage2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """avg (B, S, S)."""
        _, m = self.stage1.up_maps(x)
        a, _ = self.stage2(x, m)
        return average_map(m, a.float())

    def logit4(self, x: torch.Tensor) -> torch.Tensor:
        """logit_4 (B,), the deepest exit's logit."""
        return self.stage1(x)[0][:, 3].float()


def final_cam(avg: torch.Tensor, s: int) -> torch.Tensor:
    """cam = minmax(s * avg), (B, S, S) in [0, 1]."""
    return minmax(float(s) * avg)


# ============================================================================ C^2AM losses
def similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """S_ij = clamp(cos(x_i, y_j), 5e-4, 0.9995); x (N, D), y (M, D) -> (N, M)."""
    return (F.normalize(x.float(), dim=1) @ F.normalize(y.float(), dim=1).T).clamp(*SIM_CLAMP)


def rank_weights(sim: torch.Tensor) -> torch.Tensor:
    """exp(-0.25 (r_ij - 1)), r_ij the 0-based rank of S_ij in row i sorted descending."""
    order = sim.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)  # rank[i, j] = position of column j in row i's descending order
    return torch.exp(-RANK_ALPHA * (rank.to(sim.dtype) - 1.0))


def sim_max(x: torch.Tensor) -> torch.Tensor:
    """SimMax(X) = mean_ij -log S(X, X)_ij * exp(-0.25 (r_ij - 1))."""
    sim = similarity(x, x)
    return (-torch.log(sim) * rank_weights(sim.detach())).mean()


def sim_min(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """SimMin(F, B) = mean_ij -log(1 - S(B, F)_ij)."""
    return (-torch.log(1.0 - similarity(bg, fg))).mean()


def exit_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 = sum_k w_k BCEWithLogits(logit_k, y); logits (B, 4), y (B,) in {0, 1}."""
    w = torch.tensor(EXIT_WEIGHTS, device=logits.device)
    per_exit = torch.stack([F.binary_cross_entropy_with_logits(logits[:, k].float(), y.float()) for k in range(4)])
    return (w * per_exit).sum()


def c2am_loss(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """L = SimMax(fg) + SimMin(fg, bg) + SimMax(bg)."""
    return sim_max(fg) + sim_min(fg, bg) + sim_max(bg)


# ============================================================================ SimCLR pieces
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = SIMCLR_TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent over 2B L2-normalised projections (the other view is the positive)."""
    z = torch.cat([z1, z2], dim=0).float()  # (2B, D)
    n = z1.shape[0]
    logits = z @ z.T / temperature  # (2B, 2B)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def random_resized_crop(x: torch.Tensor, g: torch.Generator, flips: bool) -> torch.Tensor:
    """RandomResizedCrop(S) (scale 0.08-1, ratio 3/4-4/3), optional left-right flip; (B, C, S, S).

    The crop box is drawn as torchvision does (10 tries; then torchvision's fallback, which
    for a square image and a ratio range containing 1 is the whole image) and resampled
    bilinearly at S x S through ``grid_sample`` (border padding, no antialiasing).
    """
    b, _, s, _ = x.shape
    theta = torch.zeros(b, 2, 3)
    log_r = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for i in range(b):
        u = torch.rand(10, 4, generator=g)
        box = None
        for area_u, ratio_u, pos_y, pos_x in u.tolist():
            area = s * s * (CROP_SCALE[0] + area_u * (CROP_SCALE[1] - CROP_SCALE[0]))
            ratio = math.exp(log_r[0] + ratio_u * (log_r[1] - log_r[0]))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= s and 0 < h <= s:
                box = (pos_y * (s - h), pos_x * (s - w), h, w)
                break
        if box is None:
            box = (0.0, 0.0, s, s)
        top, left, h, w = box
        theta[i, 0, 0] = w / s  # x_in = cx + (w / S) x_out in normalised coordinates
        theta[i, 0, 2] = (2 * left + w) / s - 1
        theta[i, 1, 1] = h / s
        theta[i, 1, 2] = (2 * top + h) / s - 1
    if flips:
        flip = torch.rand(b, generator=g) < 0.5
        theta[flip, 0, 0] *= -1
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def channel_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-channel brightness then contrast jitter (factors U[0.2, 1.8]) with p = 0.8; (B, C, S, S)."""
    b, c = x.shape[:2]
    apply = (torch.rand(b, generator=g) < JITTER_P).to(x.device)[:, None, None, None]
    bright = (1 - JITTER + 2 * JITTER * torch.rand(b, c, 1, 1, generator=g)).to(x.device, x.dtype)
    contrast = (1 - JITTER + 2 * JITTER * torch.rand(b, c, 1, 1, generator=g)).to(x.device, x.dtype)
    y = (x * bright).clamp(0, 1)
    mean = y.mean(dim=(-2, -1), keepdim=True)
    y = ((y - mean) * contrast + mean).clamp(0, 1)
    return torch.where(apply, y, x)


def simclr_view(x: torch.Tensor, g: torch.Generator, flips: bool) -> torch.Tensor:
    return channel_jitter(random_resized_crop(x, g, flips), g)


# ============================================================================ training
def _adam(params, iterations: int):
    opt = torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(iterations)), eta_min=LR_MIN)


def _autocast(dev: torch.device, bf16: bool):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(bf16))


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if len(np.unique(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def val_auc_and_loss(model: MultiExitResNet, data: Any, batch: int, device: Any,
                     bf16: bool = False) -> tuple[float | None, float | None]:
    """(validation AUC of sigma(logit_4), its BCE); AUC None when the split holds one class."""
    idx = np.asarray(data.split("val"))
    if len(idx) == 0:
        return None, None
    dev = torch.device(device)
    was = model.training
    model.eval()
    p, y = [], []
    with torch.no_grad(), _autocast(dev, bf16):
        for b in data.batches(idx, batch, shuffle=False, device=str(dev)):
            p.append(torch.sigmoid(model(b.images.to(dev))[0][:, 3].float()).cpu())
            y.append(b.labels.cpu())
    model.train(was)
    return auc_and_loss(torch.cat(y).numpy(), torch.cat(p).numpy())


def val_auc(model: MultiExitResNet, data: Any, batch: int, device: Any, bf16: bool = False) -> float | None:
    """Validation AUC of sigma(logit_4) (None when the split holds one class or is empty)."""
    return val_auc_and_loss(model, data, batch, device, bf16)[0]


def _rule(cfg: Mapping[str, Any], rule: ConvergenceRule | None, kind: str, per_epoch: int) -> ConvergenceRule:
    return rule if rule is not None else rule_from_profile({}, cfg, kind, default_every=per_epoch)


def train_simclr(model: SimCLRNet, data: Any, cfg: Mapping[str, Any], work: Path, seed: int, device: Any,
                 flips: bool, bf16: bool = False, progress: Callable[[int], Any] | None = None,
                 every: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 0: ``cfg.simclr_epochs`` epochs of SimCLR on the train split (labels unused)."""
    dev = torch.device(device)
    model.to(dev)
    batch = SIMCLR_BATCH_FACTOR * int(cfg["batch"])
    batches = IterationBatches(data, data.split("train"), batch, seed, dev)
    iterations = batches.epochs(int(cfg["simclr_epochs"]))
    opt = torch.optim.SGD(model.parameters(), lr=SIMCLR_LR, weight_decay=SIMCLR_WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations), eta_min=0.0)

    def step(it: int) -> float:
        x = batches.get(it).images.to(dev).float()  # (B, C, S, S)
        g = iteration_generator(seed, it)
        v1, v2 = simclr_view(x, g, flips), simclr_view(x, g, flips)
        with _autocast(dev, bf16):
            loss = nt_xent(model(v1), model(v2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    weights, info = run_resumable(work, model, opt, iterations, step, progress=progress,
                                  every=every or batches.per_epoch, sched=sched)
    info.update(stage="simclr", epochs=int(cfg["simclr_epochs"]), batch=batch, lr=SIMCLR_LR,
                temperature=SIMCLR_TEMPERATURE, flips=bool(flips), n_train=int(len(batches.idx)))
    return weights, info


def load_encoder(stage1: MultiExitResNet, simclr_state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy the SimCLR encoder into stage 1 by parameter name (strict); returns the names."""
    enc = {k[len("encoder."):]: v for k, v in simclr_state.items() if k.startswith("encoder.")}
    stage1.encoder.load_state_dict(enc, strict=True)
    return sorted(enc)


def train_stage1(model: MultiExitResNet, data: Any, cfg: Mapping[str, Any], work: Path, seed: int, device: Any,
                 bf16: bool = False, progress: Callable[[int], Any] | None = None, every: int | None = None,
                 rule: ConvergenceRule | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 1: deep-weighted exit BCE; ``stage1_epochs`` is the cap, the convergence ``rule``
    (the profile's; defaults with one evaluation per epoch when None) scores the validation
    AUC of sigma(logit_4) with its BCE as the tie-break."""
    dev = torch.device(device)
    model.to(dev)
    batch = int(cfg["batch"])
    batches = IterationBatches(data, data.split("train"), batch, seed, dev)
    iterations = batches.epochs(int(cfg["stage1_epochs"]))
    opt, sched = _adam(model.parameters(), iterations)

    def step(it: int) -> float:
        b = batches.get(it)
        x, y = b.images.to(dev).float(), b.labels.to(dev).float()  # (B, C, S, S), (B,)
        with _autocast(dev, bf16):
            logits, _ = model(x)
        loss = exit_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    criterion = Criterion("val AUC of sigma(logit_4); tie-break its BCE",
                          lambda m: val_auc_and_loss(m, data, batch, dev, bf16))
    weights, info = run_resumable(work, model, opt, iterations, step, progress=progress,
                                  every=every or batches.per_epoch, sched=sched, criterion=criterion, rule=_rule(cfg, rule, "score", batches.per_epoch))
    conv = info["convergence"]
    info.update(stage="multi-exit", epochs_cap=int(cfg["stage1_epochs"]), batch=batch, lr=LR,
                exit_weights=list(EXIT_WEIGHTS), n_train=int(len(batches.idx)),
                val_auc=[p[2] for p in conv["curve"]], best_step=conv["kept_step"],
                selection="best validation AUC of sigma(logit_4)" if conv["kept_step"] is not None
                else "last step (validation AUC undefined)")
    return weights, info


def train_stage2(model: AttentionAggregator, stage1: MultiExitResNet, data: Any, cfg: Mapping[str, Any],
                 work: Path, seed: int, device: Any, bf16: bool = False,
                 progress: Callable[[int], Any] | None = None, every: int | None = None,
                 rule: ConvergenceRule | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 2: the C^2AM objective on the attention net; stage 1 frozen in eval.
    ``stage2_epochs`` is the cap; the convergence ``rule`` scores L2 on the validation split."""
    dev = torch.device(device)
    model.to(dev)
    stage1.to(dev).eval().requires_grad_(False)
    batch = int(cfg["batch"])
    batches = IterationBatches(data, data.split("train"), batch, seed, dev)
    iterations = batches.epochs(int(cfg["stage2_epochs"]))
    opt, sched = _adam(model.parameters(), iterations)

    def step(it: int) -> float:
        x = batches.get(it).images.to(dev).float()  # (B, C, S, S); labels unused
        with torch.no_grad(), _autocast(dev, bf16):
            _, m = stage1.up_maps(x)  # (B, 4, S, S), frozen
        with _autocast(dev, bf16):
            a, _ = model(x, m.float())
        fg, bg = fg_bg(x, a.float())
        loss = c2am_loss(fg, bg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    val_idx = np.asarray(data.split("val"))

    def val_loss(m) -> tuple[float | None, None]:
        total, n = 0.0, 0
        with _autocast(dev, bf16):
            for b in data.batches(val_idx, batch, shuffle=False, device=str(dev)):
                x = b.images.to(dev).float()
                _, maps = stage1.up_maps(x)
                a, _ = m(x, maps.float())
                fg, bg = fg_bg(x, a.float())
                total += float(c2am_loss(fg, bg)) * x.shape[0]
                n += x.shape[0]
        return (total / n if n else None), None

    criterion = Criterion("val C2AM loss L2 (lower is better)", val_loss, higher_is_better=False)
    weights, info = run_resumable(work, model, opt, iterations, step, progress=progress,
                                  every=every or batches.per_epoch, sched=sched, criterion=criterion,
                                  rule=_rule(cfg, rule, "loss", batches.per_epoch))
    info.update(stage="attention", epochs_cap=int(cfg["stage2_epochs"]), batch=batch, lr=LR,
                n_train=int(len(batches.idx)), selection="lowest validation L2")
    return weights, info


# ============================================================================ polarity
def deletion_drops(images: torch.Tensor, avg_fn: Callable[[torch.Tensor], torch.Tensor],
                   logit_fn: Callable[[torch.Tensor], torch.Tensor], batch: int = 64) -> dict[int, float]:
    """drop_s = mean[sigma(logit(x)) - sigma(logit(x * (1 - mask_s)))], mask_s = minmax(s avg) > 0.5.

    ``images`` (N, C, S, S); ``avg_fn`` gives (B, S, S) maps, ``logit_fn`` (B,) logits.
    """
    sums = {+1: 0.0, -1: 0.0}
    n = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], int(batch)):
            x = images[start:start + int(batch)]
            avg = avg_fn(x).float()
            p = torch.sigmoid(logit_fn(x).float())  # (B,)
            for s in (+1, -1):
                mask = (minmax(s * avg) > 0.5).to(x.dtype)[:, None]  # (B, 1, S, S)
                q = torch.sigmoid(logit_fn(x * (1.0 - mask)).float())
                sums[s] += float((p - q).double().sum())
            n += x.shape[0]
    return {s: v / max(1, n) for s, v in sums.items()}


def decide_polarity(drop_plus: float, drop_minus: float, tie: float = POLARITY_TIE) -> tuple[int, bool]:
    """(s, tied): the sign whose deletion lowers the classifier more; +1 on |diff| < ``tie``."""
    if abs(drop_plus - drop_minus) < tie:
        return +1, True
    return (+1 if drop_plus > drop_minus else -1), False


def polarity_test(images: torch.Tensor, avg_fn, logit_fn, batch: int = 64) -> dict[str, Any]:
    """The polarity rule on ``images`` (<= 256 label-1 training slices); JSON-able record."""
    drops = deletion_drops(images, avg_fn, logit_fn, batch)
    s, tied = decide_polarity(drops[+1], drops[-1])
    if tied:
        warnings.warn(f"amecam: the deletion test cannot tell the polarity apart (drop+ {drops[+1]:.4f}, "
                      f"drop- {drops[-1]:.4f}, |diff| < {POLARITY_TIE}); using s = +1", stacklevel=2)
    return {"s": int(s), "drop_plus": float(drops[+1]), "drop_minus": float(drops[-1]), "tied": bool(tied),
            "n_slices": int(images.shape[0]), "rule": "larger deletion drop of sigma(logit_4); +1 on a tie"}


def polarity_rows(labels: np.ndarray, train_idx: Sequence[int], g: torch.Generator,
                  limit: int = POLARITY_SLICES) -> np.ndarray:
    """<= ``limit`` seeded label-1 training rows, sorted."""
    idx = np.asarray(train_idx)
    pos = idx[np.asarray(labels)[idx] == 1]
    if len(pos) > limit:
        pos = pos[torch.randperm(len(pos), generator=g)[:limit].numpy()]
    return np.sort(pos)


__all__ = ["MultiExitResNet", "SimCLRNet", "AttentionAggregator", "AmeCamNet", "train_simclr", "train_stage1",
           "train_stage2", "polarity_test", "val_auc", "val_auc_and_loss", "sim_max", "sim_min", "c2am_loss", "geometry_problems", "final_cam",
           "load_encoder"]
