"""CLDF: contrastive learning with diffusion features (docs/methods/cldf.md), pure torch.

Zeng et al. train a small pixel decoder on frozen per-pixel features F (the CDM's decoder
activations, docs/methods/diffusion.md, or a Table 2 backbone) with a supervised contrastive loss
on *seed* pixels, then cluster each test slice's embeddings into two groups.  Everything in
this module works on tensors; the plugin (``wsss_bench_plugins.cldf``) supplies the maps,
the backbone and the cache.

A. **Seeds** (:func:`seed_sets`), from each source's own mask rule (CAM: minmax > 0.5, MG:
   Otsu; :func:`source_mask`):

   ======================  ===========  ==============
   variant                 foreground   background
   ======================  ===========  ==============
   ``cam+mg`` (CAM+MG+CL)  cam AND mg   NOT cam AND NOT mg   [paper]
   ``cam`` (CAM+CL)        cam          NOT cam              [inferred]
   ``mg`` (MG+CL)          mg           NOT mg               [inferred]
   ======================  ===========  ==============

   :func:`seed_composition` counts them and the share of background seeds inside tissue
   (non-zero input), the quantity that decides whether 2-means can split object from tissue
   rather than tissue from air.
B. **Sampling** per batch (:func:`sample_pixels`): every fg pixel of the batch, uniformly
   subsampled to ``fg_cap``; ``bg_per_batch`` bg pixels uniformly without replacement from
   the union of the batch's bg pixels (all of them if fewer); a batch with < 2 selected
   pixels is skipped.  Returns (N, 3) = (batch index, row, column) coordinates, so the
   backbone gathers features only there (never a (B, D, S, S) tensor).
C. **Decoder** (:class:`PixelDecoder`): frozen per-channel standardisation (from the
   selected pixels of the first 16 training batches, std clamped >= 1e-6; :class:`Moments`),
   then Linear(D, 16) -> ReLU -> BN1d -> ... -> Linear(16, out_dim): ``depth`` Linear layers
   and ``depth - 1`` BatchNorm1d layers (paper: D -> 16 -> 16 -> 16 -> 16).
D. **Loss** (:func:`supcon_loss`): SupCon with cosine similarity and temperature tau,
   the mean over anchors that have positives; self-pairs removed with -inf and the detached
   row maximum subtracted before ``logsumexp``; 0 * sum(z) and a warning if no anchor has a
   positive.
E. **Training** (:func:`train_decoder`): SGD lr 1.0, momentum 0.9, weight decay 0 on
   :class:`wsss_bench.nn.training.IterationBatches` (reshuffled per epoch with a seed),
   through the resumable loop :func:`wsss_bench.nn.training.run_resumable`.
F. **Inference**: :func:`embed_stream` writes the decoder's output for a streamed slice
   into an (S^2, out_dim) buffer; :func:`kmeans` is batched 2-means (k-means++ init,
   restarts, <= 50 Lloyd iterations, tol 1e-4 relative to the data variance as in
   scikit-learn, seeded per slice, lowest inertia kept); :func:`foreground_cluster` picks
   the cluster holding more seed-fg pixels (none: higher mean CAM, tie: the smaller
   cluster); :func:`segment` chains the three.

Importing this module imports torch (the decoder is an ``nn.Module``): plugins import it
inside ``prepare``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss_bench.cache import atomic_path
from wsss_bench.maps import binarize_cam, otsu_masks
from wsss_bench.nn.training import iteration_generator, run_resumable

log = logging.getLogger(__name__)

VARIANTS = ("cam+mg", "cam", "mg")
#: docs/methods/cldf.md / E and profiles.toml [common]
HIDDEN = 16
LR = 1.0
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0
STANDARDISE_BATCHES = 16
STD_FLOOR = 1e-6
NORM_EPS = 1e-8
#: docs/methods/cldf.md
KMEANS_MAX_ITER = 50
KMEANS_TOL = 1e-4


# ============================================================================ A. seeds
def source_mask(maps: torch.Tensor, rule: str) -> torch.Tensor:
    """(B, S, S) bool mask of a source's maps under its own rule (``cam`` or ``otsu``)."""
    if rule == "cam":
        return binarize_cam(maps)
    if rule == "otsu":
        return otsu_masks(maps)
    raise ValueError(f"mask rule {rule!r}: expected 'cam' or 'otsu'")


def seed_sets(cam: torch.Tensor | None, mg: torch.Tensor | None, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fg, bg) bool seed masks of ``variant`` from the CAM and MG masks (either may be None if unused)."""
    if variant == "cam+mg":
        if cam is None or mg is None:
            raise ValueError("variant cam+mg needs both a CAM mask and an MG mask")
        return cam & mg, ~cam & ~mg
    if variant == "cam":
        if cam is None:
            raise ValueError("variant cam needs a CAM mask")
        return cam.clone(), ~cam
    if variant == "mg":
        if mg is None:
            raise ValueError("variant mg needs an MG mask")
        return mg.clone(), ~mg
    raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")


def tissue_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool: pixels where any input channel is non-zero (docs/methods/cldf.md, ``tissue``)."""
    return (images != 0).any(dim=1)


def seed_composition(fg: torch.Tensor, bg: torch.Tensor, tissue: torch.Tensor) -> dict[str, Any]:
    """Counts of fg / bg seeds and where the bg seeds lie (inside tissue or in the air)."""
    n_fg, n_bg = int(fg.sum()), int(bg.sum())
    bg_tissue = int((bg & tissue).sum())
    pixels = int(fg[0].numel()) * int(fg.shape[0]) if fg.ndim == 3 else int(fg.numel())
    empty_fg = int((fg.reshape(fg.shape[0], -1).sum(1) == 0).sum()) if fg.ndim >= 2 else 0
    return {
        "slices": int(fg.shape[0]),
        "pixels": pixels,
        "fg": n_fg,
        "bg": n_bg,
        "unlabelled": pixels - n_fg - n_bg,
        "bg_in_tissue": bg_tissue,
        "bg_tissue_share": (bg_tissue / n_bg) if n_bg else None,
        "tissue": int(tissue.sum()),
        "slices_without_fg": empty_fg,
    }


def merge_composition(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> dict[str, Any]:
    """Sum two :func:`seed_composition` records."""
    if not a:
        return dict(b)
    keys = ("slices", "pixels", "fg", "bg", "unlabelled", "bg_in_tissue", "tissue", "slices_without_fg")
    out = {k: int(a[k]) + int(b[k]) for k in keys}
    out["bg_tissue_share"] = out["bg_in_tissue"] / out["bg"] if out["bg"] else None
    return out


def pack_masks(masks: torch.Tensor):
    """(B, S, S) bool -> uint8 numpy bit array (B, ceil(S*S/8)) for the cache."""
    flat = masks.reshape(masks.shape[0], -1).cpu().numpy().astype(bool)
    return np.packbits(flat, axis=1)


def unpack_masks(bits, size: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: (B, S, S) bool tensor."""
    flat = np.unpackbits(np.asarray(bits), axis=1, count=size * size).astype(bool)
    return torch.from_numpy(flat).reshape(-1, size, size)


# ============================================================================ B. sampling
def _choose(n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``min(n, k)`` distinct positions in [0, n), uniformly (all of them, in order, if n <= k)."""
    if n <= k:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:k].sort().values


def sample_pixels(fg: torch.Tensor, bg: torch.Tensor, fg_cap: int, bg_per_batch: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pixels for one contrastive step: (coords (N, 3) long [b, row, col], labels (N,) long), or None.

    fg: all fg pixels of the batch, uniformly subsampled to ``fg_cap``; bg: ``bg_per_batch``
    drawn uniformly without replacement from the union of the batch's bg pixels, or all of
    them if fewer.  Label 1 = fg, 0 = bg.  None when fewer than 2 pixels are selected.
    Random draws use ``generator`` (CPU), so a resumed run draws the same pixels.
    """
    if fg.shape != bg.shape or fg.ndim != 3:
        raise ValueError(f"fg and bg must be (B, S, S) masks of one shape, got {tuple(fg.shape)}, {tuple(bg.shape)}")
    if bool((fg & bg).any()):
        raise ValueError("a pixel cannot be a fg and a bg seed at once")
    b, h, w = fg.shape
    fg_idx = torch.nonzero(fg.reshape(-1).cpu()).flatten()
    bg_idx = torch.nonzero(bg.reshape(-1).cpu()).flatten()
    fg_idx = fg_idx[_choose(fg_idx.numel(), int(fg_cap), generator)]
    bg_idx = bg_idx[_choose(bg_idx.numel(), int(bg_per_batch), generator)]
    flat = torch.cat([fg_idx, bg_idx])
    if flat.numel() < 2:
        return None
    labels = torch.cat([torch.ones(fg_idx.numel(), dtype=torch.long), torch.zeros(bg_idx.numel(), dtype=torch.long)])
    coords = torch.stack([flat // (h * w), (flat % (h * w)) // w, flat % w], dim=1)  # (N, 3)
    return coords, labels


# ============================================================================ C. decoder
class PixelDecoder(nn.Module):
    """Standardise(D) -> [Linear -> ReLU -> BN1d] x (depth - 1) -> Linear(., out_dim).

    Hidden width 16 (paper: D -> 16 -> 16 -> 16 -> 16; Fig. 4 keeps the hidden width at 16
    while it varies the output dimension or the depth).  ``depth = 1`` is Linear(D, out_dim).
    The standardisation is two buffers (``mean``, ``std``), frozen, saved with the weights.
    """

    def __init__(self, dim: int, out_dim: int = 16, depth: int = 4, hidden: int = HIDDEN) -> None:
        super().__init__()
        if depth < 1 or out_dim < 1 or dim < 1:
            raise ValueError(f"PixelDecoder needs dim, out_dim, depth >= 1 (got {dim}, {out_dim}, {depth})")
        self.dim, self.out_dim, self.depth = int(dim), int(out_dim), int(depth)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.BatchNorm1d(hidden)]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    @torch.no_grad()
    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std).clamp_min(STD_FLOOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, out_dim)
        return self.mlp((x.to(self.mean.dtype) - self.mean) / self.std)


class Moments:
    """Per-channel mean and (population) std over streamed (n, D) rows, float64 (Chan's merge)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.n = n

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.n == 0:
            raise ValueError("no rows seen: cannot estimate the standardisation")
        std = (self.m2 / self.n).sqrt().clamp_min(STD_FLOOR)
        return self.mean.float(), std.float()


# ============================================================================ D. loss
class _OffDiagonalLogSumExp(torch.autograd.Function):
    """lse_i = log sum_{k != i} exp(zn_i . zn_k / tau) for rows zn (N, O), with one (N, N) buffer.

    Forward: the similarity matrix is built, its diagonal set to -inf, shifted by its row
    maximum, exponentiated and normalised in place, so the buffer ends as the softmax P.
    Backward: for upstream gradients g, d(sum_i g_i lse_i)/d zn_j = (sum_k A_jk zn_k +
    sum_i A_ij zn_i) / tau with A = diag(g) P, i.e. (A zn + A^T zn) / tau: two products and
    no further (N, N) tensor beyond A.
    """

    @staticmethod
    def forward(ctx: Any, zn: torch.Tensor, tau: float) -> torch.Tensor:
        s = torch.mm(zn, zn.t()).div_(tau)
        s.diagonal().fill_(float("-inf"))
        m = s.max(dim=1, keepdim=True).values
        s.sub_(m).exp_()
        den = s.sum(dim=1, keepdim=True)
        s.div_(den)  # P: the softmax over k != i
        ctx.save_for_backward(zn, s)
        ctx.tau = tau
        return (m + den.log()).squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        zn, p = ctx.saved_tensors
        a = p * grad[:, None]
        return (torch.mm(a, zn) + torch.mm(a.t(), zn)).div_(ctx.tau), None


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, Eq. 2 'out'), cosine similarity.

    s_ij = z_i.z_j / (|z_i||z_j| tau); P(i) = {j != i: l_j = l_i};
    l_i = -1/|P(i)| sum_{j in P(i)} [s_ij - log sum_{k != i} exp(s_ik)];
    L = mean of l_i over anchors with P(i) non-empty (0 * sum(z) and a warning if none).

    Computed as l_i = logsumexp_{k != i} s_ik - (zn_i . C_{l_i} - zn_i . zn_i) / (tau |P(i)|),
    where C_c is the sum of the normalised embeddings of class c: the positives' sum needs no
    (N, N) mask, and the only (N, N) work is the logsumexp (:class:`_OffDiagonalLogSumExp`,
    stabilised by its row maximum, with its gradient written out).  Equal to the textbook
    form to float rounding; about 4x faster at the N ~ 3000 pixels of a cpu-profile step.
    """
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"supcon_loss expects z (N, O) and labels (N,), got {tuple(z.shape)}, {tuple(labels.shape)}")
    labels = labels.to(z.device)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n_pos = counts[inverse] - 1  # (N,) positives of each anchor
    has = n_pos > 0
    if not bool(has.any()):
        log.warning("supcon_loss: no anchor has a positive (every label is a singleton); loss = 0")
        return 0.0 * z.sum()
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    log_denom = _OffDiagonalLogSumExp.apply(zn, float(tau))  # (N,) log sum_{k != i} exp(s_ik)
    class_sum = zn.new_zeros((classes.numel(), zn.shape[1])).index_add_(0, inverse, zn)  # (C, O)
    pos_sum = ((zn * class_sum[inverse]).sum(1) - (zn * zn).sum(1)) / float(tau)  # sum_{j in P(i)} s_ij
    per_anchor = log_denom[has] - pos_sum[has] / n_pos[has]
    return per_anchor.mean()


# ============================================================================ E. training
def standardisation(decoder: PixelDecoder, batches: Any, seeds_for: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                    gather: Callable[[Any, torch.Tensor], torch.Tensor], sample: Callable[[Any, int], Any],
                    iterations: int, n_batches: int = STANDARDISE_BATCHES) -> dict[str, Any]:
    """Estimate the frozen standardisation from the pixels the first ``n_batches`` steps select.

    ``gather(batch, coords)`` gives the (N, D) features of the batch's slices at ``coords``.
    """
    mom = Moments()
    used = 0
    for it in range(min(int(n_batches), int(iterations))):
        b = batches.get(it)
        sel = sample(b, it)
        if sel is None:
            continue
        coords, _ = sel
        with torch.no_grad():
            mom.add(gather(b, coords))
        used += 1
    mean, std = mom.result()
    decoder.set_standardisation(mean, std)
    return {"batches": used, "pixels": int(mom.n), "std_min": float(std.min()), "std_max": float(std.max())}


def train_decoder(decoder: PixelDecoder, batches: Any, seeds_for: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                  gather: Callable[[Any, torch.Tensor], torch.Tensor], iterations: int, seed: int,
                  work: Path, fg_cap: int, bg_per_batch: int, tau: float = 0.1, lr: float = LR,
                  momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY, device: Any = "cpu",
                  progress: Callable[[int], Any] | None = None, criterion: Any = None,
                  rule: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``decoder`` with SupCon on seed pixels; resumable (docs/methods/cldf.md).

    ``batches.get(it)`` gives the SliceBatch of iteration ``it`` (epoch-wise reshuffled,
    :class:`~wsss_bench.nn.training.IterationBatches`); ``seeds_for(batch)`` its (fg, bg)
    (B, S, S) bool seeds; ``gather(batch, coords)`` the (N, D) frozen features of the
    batch's slices at ``coords`` (the backbone on ``batch.images``, or a feature cache read by
    ``batch.index``: both give the same features).  The pixels of iteration ``it`` are drawn from
    ``iteration_generator(seed, it)``, so the standardisation (first 16 batches) sees
    exactly the pixels those steps train on, and a resumed run draws what an uninterrupted
    one would.  The standardisation is written to ``work/standardise.safetensors`` once.
    With a ``criterion`` (the caller's SupCon loss on validation seeds) and its convergence
    ``rule``, ``iterations`` is the step cap and the loop keeps the best weights.
    """
    from safetensors.torch import load_file, save_file

    dev = torch.device(device)
    decoder.to(dev)

    def sample(b: Any, it: int):
        fg, bg = seeds_for(b)
        return sample_pixels(fg, bg, fg_cap, bg_per_batch, iteration_generator(seed, it))

    std_file = Path(work) / "standardise.safetensors"
    if std_file.is_file():
        st = load_file(str(std_file))
        decoder.set_standardisation(st["mean"], st["std"])
        std_info = {"restored": True}
    else:
        std_info = standardisation(decoder, batches, seeds_for, lambda b, c: gather(b, c.to(dev)).to(dev), sample,
                                   iterations)
        with atomic_path(std_file) as tmp:
            save_file({"mean": decoder.mean.cpu().contiguous(), "std": decoder.std.cpu().contiguous()}, str(tmp))

    opt = torch.optim.SGD(decoder.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    skipped: list[int] = []
    sizes: list[int] = []

    def step(it: int) -> float:
        b = batches.get(it)
        sel = sample(b, it)
        if sel is None:  # fewer than 2 seed pixels in the whole batch
            skipped.append(it)
            return 0.0
        coords, labels = sel
        with torch.no_grad():
            feats = gather(b, coords.to(dev)).to(dev).float()  # (N, D), frozen backbone
        z = decoder(feats)  # (N, out_dim)
        loss = supcon_loss(z.float(), labels.to(dev), tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sizes.append(int(labels.numel()))
        return float(loss.detach())

    weights, info = run_resumable(work, decoder, opt, int(iterations), step, progress=progress,
                                  criterion=criterion, rule=rule)
    info.update(lr=lr, momentum=momentum, weight_decay=weight_decay, tau=float(tau), fg_cap=int(fg_cap),
                bg_per_batch=int(bg_per_batch), standardisation=std_info, skipped_this_attempt=len(skipped),
                mean_pixels_per_step=(sum(sizes) / len(sizes)) if sizes else None)
    return weights, info


# ============================================================================ F. inference
def embed_stream(stream: Iterator[tuple[slice, torch.Tensor]], n_pixels: int, decoder: PixelDecoder) -> torch.Tensor:
    """(n_pixels, out_dim) embeddings of one streamed slice; the decoder must be in eval."""
    buf: torch.Tensor | None = None
    with torch.no_grad():
        for sl, feats in stream:
            z = decoder(feats.float())
            if buf is None:
                buf = z.new_empty((n_pixels, decoder.out_dim))
            buf[sl] = z
    if buf is None:
        raise ValueError("embed_stream: the backbone streamed no pixels")
    return buf


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _sqdist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(B, N, K) squared Euclidean distances of points (B, N, O) to centres (B, K, O)."""
    return ((x[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)


def _pick(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index per row of ``weights`` (B, N) drawn with probability proportional to it, by ``u`` (B,) in [0,1)."""
    cdf = weights.double().cumsum(1)  # (B, N)
    total = cdf[:, -1:]
    target = u.double()[:, None].to(cdf.device) * total
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # first index with cdf > target
    return idx.clamp_(max=weights.shape[1] - 1)


def kmeans_pp(x: torch.Tensor, valid: torch.Tensor, k: int, u: torch.Tensor) -> torch.Tensor:
    """k-means++ centres (B, k, O) (Arthur & Vassilvitskii 2007), batched.

    ``u`` (B, k) uniforms in [0, 1): the first centre is a uniformly drawn valid point, each
    next one a valid point drawn with probability proportional to its squared distance to the
    nearest chosen centre (uniformly among valid points if all distances are 0).
    """
    b, n, o = x.shape
    w = valid.to(x.dtype)
    rows = torch.arange(b, device=x.device)
    first = _pick(w, u[:, 0])
    centres = [x[rows, first]]  # (B, O)
    d2 = ((x - centres[0][:, None]) ** 2).sum(-1)  # (B, N)
    for j in range(1, k):
        wj = d2 * w
        degenerate = wj.sum(1) <= 0
        wj = torch.where(degenerate[:, None], w, wj)
        nxt = _pick(wj, u[:, j])
        centres.append(x[rows, nxt])
        d2 = torch.minimum(d2, ((x - centres[-1][:, None]) ** 2).sum(-1))
    return torch.stack(centres, dim=1)


def lloyd(x: torch.Tensor, centres: torch.Tensor, valid: torch.Tensor | None = None, max_iter: int = KMEANS_MAX_ITER,
          tol: float = KMEANS_TOL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm from ``centres`` (B, K, O) on points (B, N, O), batched over B.

    Each slice stops when the summed squared centre shift is <= tol * mean per-feature
    variance of its valid points (scikit-learn's ``tol``), or when its labels no longer
    change, or after ``max_iter`` iterations.  An empty cluster keeps its centre.  Final
    labels are assigned to the final centres.  Returns (labels (B, N), centres, inertia (B,)
    over valid points, iterations (B,)).
    """
    b, n, o = x.shape
    k = centres.shape[1]
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device)
    w = valid.to(x.dtype)
    cnt = w.sum(1).clamp_min(1.0)  # (B,)
    mu = (x * w[..., None]).sum(1) / cnt[:, None]
    var = (((x - mu[:, None]) ** 2) * w[..., None]).sum(1) / cnt[:, None]  # (B, O)
    tol_b = var.mean(1) * float(tol)  # (B,)
    c = centres.to(x.dtype).clone()
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    iters = torch.zeros(b, dtype=torch.long, device=x.device)
    labels = _sqdist(x, c).argmin(-1)
    for _ in range(int(max_iter)):
        onehot = F.one_hot(labels, k).to(x.dtype) * w[..., None]  # (B, N, K)
        counts = onehot.sum(1)  # (B, K)
        sums = onehot.transpose(1, 2) @ x  # (B, K, O)
        new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], c)
        shift = ((new - c) ** 2).sum((1, 2))  # (B,)
        c = torch.where(done[:, None, None], c, new)
        iters = iters + (~done).long()
        new_labels = _sqdist(x, c).argmin(-1)
        same = ((new_labels == labels) | ~valid).all(1)
        labels = torch.where(done[:, None], labels, new_labels)
        done = done | same | (shift <= tol_b)
        if bool(done.all()):
            break
    d = _sqdist(x, c)
    labels = d.argmin(-1)
    inertia = (d.gather(-1, labels[..., None])[..., 0] * w).sum(1)
    return labels, c, inertia, iters


def kmeans(x: torch.Tensor, seeds: Sequence[int], valid: torch.Tensor | None = None, k: int = 2, restarts: int = 3,
           max_iter: int = KMEANS_MAX_ITER, tol: float = KMEANS_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means on (B, N, O): k-means++ init, ``restarts`` runs, lowest inertia kept.

    ``seeds[b]`` seeds slice b's CPU generator (one per slice, so a slice's clusters do not
    depend on the batch it came in).  Returns (labels (B, N), inertia (B,)).
    """
    b, n, o = x.shape
    if len(seeds) != b:
        raise ValueError(f"kmeans: {len(seeds)} seeds for {b} slices")
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device)
    if bool((valid.sum(1) < 1).any()):
        raise ValueError("kmeans: a slice has no valid point")
    u = torch.stack([torch.rand(restarts, k, generator=torch.Generator().manual_seed(int(s) % (2**63)))
                     for s in seeds])  # (B, R, k), drawn on CPU: same on every device
    best_lab, best_in = None, None
    for r in range(int(restarts)):
        init = kmeans_pp(x, valid, k, u[:, r].to(x.device))
        lab, _, inertia, _ = lloyd(x, init, valid, max_iter, tol)
        if best_lab is None:
            best_lab, best_in = lab, inertia
        else:
            better = inertia < best_in  # first restart wins ties
            best_lab = torch.where(better[:, None], lab, best_lab)
            best_in = torch.where(better, inertia, best_in)
    assert best_lab is not None and best_in is not None, "kmeans needs restarts >= 1"
    return best_lab, best_in


def foreground_cluster(labels: torch.Tensor, seed_fg: torch.Tensor, score: torch.Tensor,
                       valid: torch.Tensor | None = None, k: int = 2) -> torch.Tensor:
    """The foreground cluster id (B,) of each slice.

    The cluster holding more of the slice's seed-fg pixels; with no seed-fg pixel (or a tie)
    the one with the higher mean ``score`` (the CAM; MG for MG+CL); if that ties too, the
    smaller cluster (then the lower id).  Only ``valid`` pixels count.
    """
    b = labels.shape[0]
    valid = torch.ones_like(seed_fg, dtype=torch.bool) if valid is None else valid
    onehot = F.one_hot(labels.reshape(b, -1), k).to(torch.float64) * valid.reshape(b, -1, 1).to(torch.float64)
    size = onehot.sum(1)  # (B, K)
    fg_count = (onehot * seed_fg.reshape(b, -1, 1).to(torch.float64)).sum(1)
    mean_score = (onehot * score.reshape(b, -1, 1).to(torch.float64)).sum(1) / size.clamp_min(1.0)
    mean_score = torch.where(size > 0, mean_score, torch.full_like(mean_score, -math.inf))
    out = []
    for i in range(b):
        keys = [(fg_count[i, j].item(), mean_score[i, j].item(), -size[i, j].item(), -j) for j in range(k)]
        out.append(max(range(k), key=lambda j: keys[j]))
    return torch.tensor(out, dtype=torch.long, device=labels.device)


def segment(emb: torch.Tensor, seed_fg: torch.Tensor, score: torch.Tensor, seeds: Sequence[int],
            valid: torch.Tensor | None = None, restarts: int = 3, max_iter: int = KMEANS_MAX_ITER,
            tol: float = KMEANS_TOL) -> torch.Tensor:
    """Masks (B, N) bool from embeddings (B, N, O): L2-normalise, 2-means, foreground rule.

    With ``valid`` (the ``tissue`` region) only valid pixels are clustered and the others are
    background.
    """
    x = l2_normalise(emb.float())
    empty = None
    if valid is not None:
        valid = valid.reshape(x.shape[:2]).to(x.device)
        empty = valid.sum(1) == 0  # no tissue at all: cluster everything, predict nothing
        valid = valid | empty[:, None]
    labels, _ = kmeans(x, seeds, valid, 2, restarts, max_iter, tol)
    fg_id = foreground_cluster(labels, seed_fg.reshape(labels.shape).to(x.device),
                               score.reshape(labels.shape).to(x.device), valid)
    masks = labels == fg_id[:, None]
    if valid is not None:
        masks = masks & valid & ~empty[:, None]
    return masks


__all__ = ["VARIANTS", "source_mask", "seed_sets", "tissue_mask", "seed_composition", "merge_composition",
           "pack_masks", "unpack_masks", "sample_pixels", "PixelDecoder", "Moments", "supcon_loss",
           "standardisation", "train_decoder", "embed_stream", "l2_normalise", "kmeans_pp", "lloyd", "kmeans",
           "foreground_cluster", "segment"]
