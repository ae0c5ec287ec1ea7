"""DiG (Yoon et al. 2024; yoon307/DiG), adapted: docs/methods/dig.md.

A ViT CAM, refined by cross-attention to low-resolution diffusion features, plus
consistency with a denoised copy of the image.

**ViT** (MCTformer-V2 style, hand-written so attention weights and query projections come
back; sizes from the profile's ``dig`` section): patch S/g, grid g, one class token (one
foreground class), learned positional embeddings, stochastic depth rising linearly to 0.1.

- patch CAM  A = Conv3x3(dim -> 1) on the (g, g) patch tokens;
- patch logit  y_p = mean top-3 ReLU(A) - mean top-3 ReLU(-A);
- class logit  y_c = mean over dims of the final class token;
- mtatt = sum over layers of the heads-averaged class->patch attention, (B, 1, g, g);
- cams  = mtatt * ReLU(A);
- rcams = (sum over layers of the heads-averaged patch->patch attention) @ cams.

**LFCA** (two copies; the detached query projections of the last and second-to-last layer;
outputs averaged).  kv = ResBlock(5 D_f -> W); keys LN(Conv1x1(kv -> dim)); values
LN(Conv3x3(kv -> W)); queries LN(Linear(q)); ``lfca_heads``-head cross-attention from the
1 + g^2 tokens to the g^2 feature positions.  Class branch: Linear(W -> dim) + the query
residual, then a 4x MLP (pre-LN, residual); diff_cls = mean over dims.  Patch branch:
ReLU(Conv3x3(o)) + kv with drop-path 0.1, then a 1x1-conv MLP (GELU) with a residual;
cam_diff = ReLU(Conv1x1(ReLU(Conv3x3(.)))) and diff_pcls = top-3 max-min of its pre-ReLU
map.

**Diffusion features** (:func:`diffusion_features`): the frozen CDM (class label 1) or a
separately trained unconditional DDPM, at harness t = 0..4 with fresh seeded noise per
slice and t; the middle block's output and every up block's output, each resized to (g, g)
with ``align_corners=True`` and concatenated (D_f channels per t); the 5 t's stacked on the
channel axis -> (B, 5 D_f, g, g).  x0-hat (:func:`denoised`) comes from the same network at
harness t = 100.  :func:`build_feature_cache` stores both for the training slices in
memory-mapped ``.npy`` files sized up front.

**Losses** (:func:`dig_losses`): L_cls + L_pred + L_cls_diff, and after the warm-up
fraction L_cons + 10 L_pac; BCE-with-logits throughout (one class); the distillation term
uses Bernoulli(sigmoid(z / T)), T = 5, alpha = 0.2, teacher (the ViT's logits) detached.

**Training** (:func:`train_dig`): AdamW lr 5e-4 B/512, wd 0.05 (none on biases, norms,
positional embedding and class token, DeiT's rule), per-iteration linear warm-up over the
first 5/60 of training then cosine to 0; flips (BraTS) flip image, features and x0-hat
together.  Resumable through :func:`wsss_bench.nn.training.run_resumable`.

Importing this module imports torch (plugins import it inside ``prepare``).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss_bench.cache import open_memmap_reserved  # blocks reserved: a full disk is ENOSPC, not SIGBUS
from wsss_bench.maps import minmax, upsample
from wsss_bench.nn import diffusion as dif
from wsss_bench.nn import training

Tensor = torch.Tensor

# ---------------------------------------------------------------------------- recipe
#: harness timesteps of the diffusion features [reference code]
FEATURE_T = (0, 1, 2, 3, 4)
#: harness timestep of the denoised image x0-hat [reference code: SFI = 100]
DENOISE_T = 100
#: class label the shared CDM is conditioned on (positive class) [inferred]
CDM_LABEL = 1
TOPK = 3
DROP_PATH = 0.1
KD_ALPHA = 0.2
KD_T = 5.0
PAC_WEIGHT = 10.0
LR_BASE = 5e-4
LR_REF_BATCH = 512
WEIGHT_DECAY = 0.05
#: warm-up of the learning rate, as a fraction of training (5 of 60 epochs) [reference code]
LR_WARMUP_FRACTION = 5.0 / 60.0
LN_EPS = 1e-6


def dig_lr(batch: int) -> float:
    """lr = 5e-4 * B / 512 (DeiT's linear scaling, as MCTformer and DiG use)."""
    return LR_BASE * int(batch) / LR_REF_BATCH


# ============================================================================ the ViT
class DropPath(nn.Module):
    """Stochastic depth per sample: zero a residual branch with probability p, scale by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) < keep
        return x * mask.to(x.dtype) / keep


class Attention(nn.Module):
    """Multi-head self-attention that also returns its weights and its query projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = int(heads)
        self.head_dim = dim // self.heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, dh) each
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N), rows sum to 1
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out), attn, q


class Block(nn.Module):
    """Pre-LN transformer block (DeiT): attention and a 4x GELU MLP, each with drop-path."""

    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        o, attn, q = self.attn(self.norm1(x))
        x = x + self.drop_path(o)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn, q


def topk_max_min(cam: Tensor, k: int = TOPK) -> Tensor:
    """mean top-k ReLU(m) - mean top-k ReLU(-m) over the positions of (B, 1, h, w) maps -> (B,)."""
    flat = cam.flatten(1)  # (B, h*w)
    k = min(int(k), flat.shape[1])
    return F.relu(flat).topk(k, dim=1).values.mean(1) - F.relu(-flat).topk(k, dim=1).values.mean(1)


class DiGViT(nn.Module):
    """MCTformer-V2-style ViT with one class token (docs/methods/dig.md, "ViT")."""

    def __init__(self, in_chans: int, image_size: int, patch: int, dim: int, depth: int, heads: int,
                 drop_path: float = DROP_PATH) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.grid = image_size // patch
        self.dim, self.depth = int(dim), int(depth)
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        rates = torch.linspace(0, float(drop_path), depth).tolist()  # DeiT's stochastic-depth rule
        self.blocks = nn.ModuleList([Block(dim, heads, r) for r in rates])
        self.head = nn.Conv2d(dim, 1, kernel_size=3, padding=1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Final tokens (B, 1+g^2, dim), per-layer attention (B, H, N, N) and queries (B, H, N, dh)."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, g^2, dim)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        attns, queries = [], []
        for blk in self.blocks:
            t, attn, q = blk(t)
            attns.append(attn)
            queries.append(q)
        return t, attns, queries

    def forward(self, x: Tensor) -> dict[str, Any]:
        t, attns, queries = self.tokens(x)
        b, g = t.shape[0], self.grid
        patches = t[:, 1:].transpose(1, 2).reshape(b, self.dim, g, g)  # (B, dim, g, g)
        a = self.head(patches)  # (B, 1, g, g) patch CAM
        att = torch.stack(attns).mean(dim=2)  # (L, B, N, N), heads averaged
        mtatt = att[:, :, 0, 1:].sum(0).reshape(b, 1, g, g)  # class -> patch, summed over layers
        cams = mtatt * F.relu(a)
        patch_att = att[:, :, 1:, 1:].sum(0)  # (B, g^2, g^2)
        rcams = (patch_att @ cams.reshape(b, g * g, 1)).reshape(b, 1, g, g)
        return {"cls": t[:, 0].mean(-1), "pcls": topk_max_min(a), "patch_cam": a, "mtatt": mtatt,
                "cams": cams, "rcams": rcams, "attn": attns, "q": queries}


# ============================================================================ LFCA
class ResBlock(nn.Module):
    """ReLU(GN(Conv3x3(ReLU(GN(Conv3x3(x))))) + Conv1x1(x)) (DiG's ResBlock_ysh; GN with 1 group)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(1, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(1, c_out)
        self.branch = nn.Conv2d(c_in, c_out, 1, bias=False)
        for m in (self.conv1, self.conv2, self.branch):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.branch(x))


class LFCA(nn.Module):
    """Low-resolution feature cross-attention: ViT tokens attend to the diffusion features."""

    def __init__(self, dim: int, feat_in: int, width: int, heads: int, drop_path: float = DROP_PATH) -> None:
        super().__init__()
        if dim % heads or width % heads:
            raise ValueError(f"LFCA: dim {dim} and width {width} must be multiples of heads {heads}")
        self.dim, self.width, self.heads = int(dim), int(width), int(heads)
        self.kv = ResBlock(feat_in, width)
        self.key = nn.Conv2d(width, dim, 1)
        self.norm_k = nn.LayerNorm(dim, eps=LN_EPS)
        self.value = nn.Conv2d(width, width, 3, padding=1)
        self.norm_v = nn.LayerNorm(width, eps=LN_EPS)
        self.query = nn.Linear(dim, dim)
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.out_c = nn.Linear(width, dim)
        self.norm_c = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp_c = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out_p = nn.Conv2d(width, width, 3, padding=1)
        self.mlp_p = nn.Sequential(nn.Conv2d(width, 4 * width, 1), nn.GELU(), nn.Conv2d(4 * width, width, 1))
        self.drop_path = DropPath(drop_path)
        nn.init.xavier_uniform_(self.key.weight)
        nn.init.xavier_uniform_(self.value.weight)
        for m in (self.query, self.out_c, *self.mlp_c):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, q_tokens: Tensor, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q_tokens (B, 1+N, dim), feats (B, 5 D_f, g, g) -> class (B, 1, dim), patch (B, W, g, g), weights."""
        b, n1, _ = q_tokens.shape
        g = feats.shape[-1]
        kv = self.kv(feats)  # (B, W, g, g)
        k = self.norm_k(self.key(kv).flatten(2).transpose(1, 2))  # (B, g^2, dim)
        v = self.norm_v(self.value(kv).flatten(2).transpose(1, 2))  # (B, g^2, W)
        q = self.norm_q(self.query(q_tokens))  # (B, 1+N, dim)
        h, dh, wh = self.heads, self.dim // self.heads, self.width // self.heads
        qh = q.reshape(b, n1, h, dh).transpose(1, 2)  # (B, h, 1+N, dh)
        kh = k.reshape(b, -1, h, dh).transpose(1, 2)  # (B, h, g^2, dh)
        vh = v.reshape(b, -1, h, wh).transpose(1, 2)  # (B, h, g^2, wh)
        attn = ((qh @ kh.transpose(-2, -1)) * dh ** -0.5).softmax(dim=-1)  # (B, h, 1+N, g^2)
        o = (attn @ vh).transpose(1, 2).reshape(b, n1, self.width)  # (B, 1+N, W)
        # class branch: Linear(W -> dim) + the query residual, then a pre-LN 4x MLP
        x_c = self.out_c(o[:, :1]) + q_tokens[:, :1]
        x_c = x_c + self.mlp_c(self.norm_c(x_c))  # (B, 1, dim)
        # patch branch on the token grid (= the feature grid): conv, + kv, 1x1-conv MLP
        side = int(round((n1 - 1) ** 0.5))
        o_p = o[:, 1:].transpose(1, 2).reshape(b, self.width, side, side)
        o_p = F.relu(self.out_p(o_p))
        if side != g:
            o_p = F.interpolate(o_p, size=(g, g), mode="bilinear", align_corners=False)
        x_p = kv + self.drop_path(o_p)
        x_p = x_p + self.drop_path(F.relu(self.mlp_p(x_p)))  # (B, W, g, g)
        return x_c, x_p, attn


class DiG(nn.Module):
    """The DiG training network: the ViT, two LFCA modules and the diffusion CAM head."""

    def __init__(self, in_chans: int, image_size: int, spec: Mapping[str, Any], feat_in: int,
                 drop_path: float = DROP_PATH) -> None:
        super().__init__()
        if int(spec["depth"]) < 2:
            raise ValueError("DiG needs a ViT depth >= 2 (the LFCA modules read the last two layers)")
        dim, width = int(spec["dim"]), int(spec["lfca_width"])
        self.vit = DiGViT(in_chans, image_size, int(spec["patch"]), dim, int(spec["depth"]), int(spec["heads"]),
                          drop_path)
        if self.vit.grid != int(spec["grid"]):
            raise ValueError(f"DiG: image size {image_size} / patch {spec['patch']} = {self.vit.grid}, "
                             f"but the profile's grid is {spec['grid']}")
        self.lfca = nn.ModuleList([LFCA(dim, feat_in, width, int(spec["lfca_heads"]), drop_path) for _ in range(2)])
        self.diff_head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))
        self.feat_in = int(feat_in)

    def forward(self, x: Tensor, feats: Tensor | None = None) -> dict[str, Any]:
        out = self.vit(x)
        if feats is None:
            return out
        b = x.shape[0]
        # detached query projections of the last and the second-to-last layer
        qs = [out["q"][-1 - i].transpose(1, 2).reshape(b, -1, self.vit.dim).detach() for i in range(2)]
        cs, ps = zip(*[(c, p) for c, p, _ in (m(q, feats) for m, q in zip(self.lfca, qs))])
        x_c = (cs[0] + cs[1]) / 2  # (B, 1, dim)
        x_p = (ps[0] + ps[1]) / 2  # (B, W, g, g)
        raw = self.diff_head(x_p)  # (B, 1, g, g)
        out.update(diff_cls=x_c[:, 0].mean(-1), diff_pcls=topk_max_min(raw), cam_diff=F.relu(raw))
        return out


# ============================================================================ losses
def bce(logit: Tensor, y: Tensor) -> Tensor:
    """BCE-with-logits on the positive class (= multilabel soft margin for one class)."""
    return F.binary_cross_entropy_with_logits(logit.float(), y.float())


def bernoulli_kd(student: Tensor, teacher: Tensor, temperature: float = KD_T) -> Tensor:
    """T^2 mean_b KL(Bern(sigmoid(teacher/T)) || Bern(sigmoid(student/T))); the teacher is detached."""
    t, s = teacher.detach().float() / temperature, student.float() / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return temperature ** 2 * kl.mean()


def max_norm(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """SEAM's max_norm per image and channel: ReLU, then ReLU(m - min - eps) / (max - min + eps)."""
    cam = F.relu(cam)
    flat = cam.flatten(2)
    hi = flat.amax(-1)[..., None, None]
    lo = flat.amin(-1)[..., None, None]
    return F.relu(cam - lo - eps) / (hi - lo + eps)


def loss_pred(out: Mapping[str, Tensor], y: Tensor, alpha: float = KD_ALPHA, temperature: float = KD_T) -> Tensor:
    """alpha [BCE(diff_cls) + BCE(diff_pcls)] + (1 - alpha) 1/2 [KD(cls -> diff_cls) + KD(pcls -> diff_pcls)]."""
    hard = bce(out["diff_cls"], y) + bce(out["diff_pcls"], y)
    soft = 0.5 * (bernoulli_kd(out["diff_cls"], out["cls"], temperature)
                  + bernoulli_kd(out["diff_pcls"], out["pcls"], temperature))
    return alpha * hard + (1 - alpha) * soft


def _weighted_l1(target: Tensor, pred: Tensor, y: Tensor) -> Tensor:
    """mean over all elements of y_b * |target - pred|, maps (B, 1, h, w)."""
    return (y.float()[:, None, None, None] * (target - pred).abs()).mean()


def loss_cons(out: Mapping[str, Tensor], y: Tensor, active: bool) -> Tensor:
    """mean y |max_norm(cam_diff)* - max_norm(resize(cams))|; * = detached; 0 before warm-up."""
    if not active:
        return out["cams"].new_zeros(())
    cams = out["cams"]
    if cams.shape[-2:] != out["cam_diff"].shape[-2:]:
        cams = F.interpolate(cams, size=out["cam_diff"].shape[-2:], mode="bilinear", align_corners=False)
    return _weighted_l1(max_norm(out["cam_diff"].detach().float()), max_norm(cams.float()), y)


def loss_pac(rcams_x: Tensor, rcams_x0: Tensor, y: Tensor, active: bool) -> Tensor:
    """mean y |max_norm(rcams(x))* - max_norm(rcams(x0-hat))|; 0 before warm-up."""
    if not active:
        return rcams_x0.new_zeros(())
    return _weighted_l1(max_norm(rcams_x.detach().float()), max_norm(rcams_x0.float()), y)


def dig_losses(model: DiG, x: Tensor, feats: Tensor, x0hat: Tensor, y: Tensor, active: bool,
               autocast: Callable[[], Any] | None = None) -> dict[str, Tensor]:
    """Every term of docs/methods/dig.md's table and their weighted sum (``total``)."""
    amp = autocast or nullcontext
    with amp():
        out = model(x, feats)
        out0 = model.vit(x0hat)
    terms = {
        "cls": bce(out["cls"], y) + bce(out["pcls"], y),
        "pred": loss_pred(out, y),
        "cons": loss_cons(out, y, active),
        "cls_diff": bce(out0["cls"], y) + bce(out0["pcls"], y),
        "pac": loss_pac(out["rcams"], out0["rcams"], y, active),
    }
    terms["total"] = terms["cls"] + terms["pred"] + terms["cons"] + terms["cls_diff"] + PAC_WEIGHT * terms["pac"]
    return terms


# ============================================================================ diffusion features
def feature_dim(spec: Mapping[str, Any]) -> int:
    """D_f of one timestep: the middle block's channels plus every up block's (reversed widths)."""
    ch = [int(c) for c in spec["channels"]]
    return ch[-1] + sum(reversed(ch))


def _unet_call(unet, x: Tensor, t: Tensor, label: int | None) -> Tensor:
    if label is None:  # unconditional DDPM (ddpm=separate)
        return unet(x, timesteps=t)
    return unet(x, timesteps=t, class_labels=torch.full((x.shape[0],), int(label), dtype=torch.long, device=x.device))


class _StopForward(Exception):
    pass


def block_outputs(unet, x: Tensor, t: Tensor, label: int | None) -> list[Tensor]:
    """[middle block output, up_blocks[0] output, ..., up_blocks[-1] output] of one forward."""
    found: list[Tensor] = []
    last = len(unet.up_blocks) - 1

    def hook_for(i: int):
        def hook(_m, _i, output):
            found.append(output)
            if i == last:
                raise _StopForward  # the output convolution is never needed

        return hook

    handles = [unet.middle_block.register_forward_hook(hook_for(-1))]
    handles += [blk.register_forward_hook(hook_for(i)) for i, blk in enumerate(unet.up_blocks)]
    try:
        _unet_call(unet, x, t, label)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return found


def slice_noise(generator_for: Callable[[str], torch.Generator], case_ids: Sequence[str], z: Sequence[int],
                channels: int, size: int, n: int = len(FEATURE_T) + 1) -> Tensor:
    """(B, n, C, S, S) seeded noise per slice: n - 1 for the feature t's, the last for x0-hat."""
    return torch.stack([torch.randn((n, channels, size, size), generator=generator_for(f"noise/dig/{c}/{k}"))
                        for c, k in zip(case_ids, z)])


def diffusion_features(unet, images: Tensor, noise: Tensor, grid: int, label: int | None = CDM_LABEL,
                       ts: Sequence[int] = FEATURE_T, profile: Any = None,
                       autocast: Callable[[], Any] | None = None) -> Tensor:
    """(B, len(ts) D_f, g, g): block outputs at each t, resized (align_corners=True), t-major.

    ``images`` (B, C, S, S) in [0, 1]; ``noise[:, k]`` is the noise of ``ts[k]``.
    """
    x0 = dif.to_model_range(images.float())
    amp = autocast or nullcontext
    per_t = []
    with torch.no_grad():
        for k, t in enumerate(ts):
            tt = dif.timesteps(t, x0.shape[0], x0.device)
            xt = dif.add_noise(x0, noise[:, k].to(x0), tt, profile)
            with amp():
                acts = block_outputs(unet, xt, tt, label)
            per_t.append(torch.cat([F.interpolate(a.float(), size=(grid, grid), mode="bilinear", align_corners=True)
                                    for a in acts], dim=1))  # (B, D_f, g, g)
    return torch.stack(per_t, dim=1).flatten(1, 2)  # (B, 5, D_f, g, g) -> (B, 5 D_f, g, g)


def denoised(unet, images: Tensor, eps: Tensor, label: int | None = CDM_LABEL, t: int = DENOISE_T,
             profile: Any = None, autocast: Callable[[], Any] | None = None) -> Tensor:
    """x0-hat = clamp((x_t - sqrt(1 - ab) eps-hat) / sqrt(ab), -1, 1) at harness t, back in [0, 1]."""
    x0 = dif.to_model_range(images.float())
    ab = float(dif.harness_alphas_cumprod(profile)[int(t)])
    tt = dif.timesteps(t, x0.shape[0], x0.device)
    amp = autocast or nullcontext
    with torch.no_grad():
        xt = dif.add_noise(x0, eps.to(x0), tt, profile)
        with amp():
            e = _unet_call(unet, xt, tt, label).float()
    x0h = ((xt - math.sqrt(1.0 - ab) * e) / math.sqrt(ab)).clamp(-1.0, 1.0)
    return (x0h + 1.0) / 2.0


class DiffusionInputs:
    """Features and x0-hat of a batch: computed by the frozen network, or read from the cache."""

    def __init__(self, unet, grid: int, label: int | None, noise_for: Callable[[Any], Tensor], profile: Any,
                 autocast: Callable[[], Any] | None = None, cache: Path | None = None) -> None:
        self.unet, self.grid, self.label, self.noise_for = unet, int(grid), label, noise_for
        self.profile, self.autocast = profile, autocast
        self.feats = self.x0hat = None
        self.pos: dict[int, int] = {}
        if cache is not None:
            self.feats = np.load(Path(cache) / "features.npy", mmap_mode="r")
            self.x0hat = np.load(Path(cache) / "x0hat.npy", mmap_mode="r")
            rows = np.load(Path(cache) / "rows.npy")
            self.pos = {int(r): i for i, r in enumerate(rows)}

    @property
    def cached(self) -> bool:
        return self.feats is not None

    def compute(self, images: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        f = diffusion_features(self.unet, images, noise[:, :-1], self.grid, self.label, profile=self.profile,
                               autocast=self.autocast)
        x0h = denoised(self.unet, images, noise[:, -1], self.label, profile=self.profile, autocast=self.autocast)
        return f, x0h

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]:
        dev = batch.images.device
        if self.cached:
            pos = np.asarray([self.pos[int(r)] for r in batch.index])
            order = np.argsort(pos)  # memmap reads in ascending order
            f, x = np.empty((len(pos),) + self.feats.shape[1:], np.float32), np.empty(
                (len(pos),) + self.x0hat.shape[1:], np.float32)
            f[order], x[order] = self.feats[pos[order]], self.x0hat[pos[order]]
            return torch.from_numpy(f).to(dev), torch.from_numpy(x).to(dev)
        return self.compute(batch.images.to(dev).float(), self.noise_for(batch).to(dev))


def build_feature_cache(work: Path, inputs: DiffusionInputs, batches: Iterable[Any], rows: Sequence[int],
                        feat_dim: int, channels: int, size: int,
                        progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Write features.npy (N, 5 D_f, g, g), x0hat.npy (N, C, S, S) and rows.npy into ``work``.

    Both arrays are ``np.lib.format.open_memmap`` files allocated at their full size before
    the first batch is computed (never one in-memory tensor); batches must follow ``rows``.
    """
    work = Path(work)
    rows = np.asarray(rows, dtype=np.int64)
    n, g, d = len(rows), int(inputs.grid), int(feat_dim)
    feats = open_memmap_reserved(work / "features.npy", np.float32, (n, d, g, g))
    x0 = open_memmap_reserved(work / "x0hat.npy", np.float32, (n, int(channels), int(size), int(size)))
    done = 0
    for b in batches:
        k = len(b)
        if not np.array_equal(np.asarray(b.index), rows[done:done + k]):
            raise RuntimeError("feature cache: batches do not follow the requested rows")
        f, x = inputs.compute(b.images.float(), inputs.noise_for(b).to(b.images.device))
        if tuple(f.shape[1:]) != (d, g, g):
            raise RuntimeError(f"feature cache: features of shape {tuple(f.shape[1:])}, expected {(d, g, g)}")
        feats[done:done + k] = f.cpu().numpy()
        x0[done:done + k] = x.cpu().numpy()
        done += k
        if progress is not None:
            progress(k)
    if done != n:
        raise RuntimeError(f"feature cache: wrote {done} of {n} rows")
    feats.flush()
    x0.flush()
    del feats, x0
    np.save(work / "rows.npy", rows)
    return {"rows": int(n), "feature_dim": d, "grid": g, "dtype": "float32",
            "bytes": int(n * (d * g * g + int(channels) * int(size) ** 2) * 4)}


# ============================================================================ training
def param_groups(model: nn.Module, weight_decay: float = WEIGHT_DECAY) -> list[dict[str, Any]]:
    """DeiT's rule: no weight decay on biases, norm weights (1-D), the positional embedding and class token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(it: int, iterations: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` iterations, then cosine from 1 to 0 (per iteration)."""
    if it < warmup:
        return (it + 1) / warmup
    rest = max(1, iterations - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / rest))


def warmup_iterations(iterations: int, fraction: float) -> int:
    """First iteration at which L_cons and L_pac apply: round(fraction * iterations)."""
    return int(round(float(fraction) * int(iterations)))


def _training():
    return training


def train_dig(model: DiG, data: Any, idx: Sequence[int], inputs: Callable[[Any], tuple[Tensor, Tensor]],
              spec: Mapping[str, Any], device: Any, seed: int, work: Path, flips: bool, warmup_fraction: float,
              bf16: bool = False, progress: Callable[[int], Any] | None = None, iterations: int | None = None,
              every: int | None = None, rule: Any = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train DiG on the rows ``idx`` of ``data`` (docs/methods/dig.md, "Training").

    ``inputs(batch) -> (features, x0-hat)`` of the (unflipped) batch.  ``epochs`` and ``batch``
    come from ``spec`` (the profile's ``dig`` section) and make the step cap; ``iterations``
    overrides it.  The convergence ``rule`` (default: one evaluation per epoch) scores the
    ViT's classification on the validation split (AUC of sigma(cls) on the image alone, as
    at inference; tie-break its BCE), keeps the best weights and stops on a plateau.
    """
    tr = _training()
    dev = torch.device(device)
    model.to(dev)
    batch = int(spec["batch"])
    batches = tr.IterationBatches(data, idx, batch, seed, dev)
    iterations = int(iterations if iterations is not None else int(spec["epochs"]) * batches.per_epoch)
    lr = dig_lr(batch)
    opt = torch.optim.AdamW(param_groups(model), lr=lr)
    lr_warm = max(1, int(round(LR_WARMUP_FRACTION * iterations)))
    warm = warmup_iterations(iterations, warmup_fraction)
    amp = (lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)) if bf16 else None
    log_terms: dict[str, float] = {}

    def step(it: int) -> float:
        b = batches.get(it)
        g = tr.iteration_generator(seed, it)
        x = b.images.to(dev).float()
        feats, x0h = inputs(b)
        feats, x0h = feats.to(dev), x0h.to(dev)
        if flips:  # one flip decision per slice, applied to the image, its features and x0-hat
            flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(dev)[:, None, None, None]
            x, feats, x0h = (torch.where(flip, v.flip(-1), v) for v in (x, feats, x0h))
        torch.manual_seed(tr.mix(seed, 3, it))  # drop-path masks: a function of (seed, iteration)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(it, iterations, lr_warm)
        terms = dig_losses(model, x, feats, x0h, b.labels.to(dev), active=it >= warm, autocast=amp)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        for k, v in terms.items():
            log_terms[k] = float(v.detach())
        return log_terms["total"]

    val_idx = data.split("val")

    def val_cls(m) -> tuple[float | None, float | None]:
        p, y = [], []
        for b in data.batches(val_idx, batch, shuffle=False, device=str(dev)):
            with (amp() if amp is not None else nullcontext()):
                out = m.vit(b.images.to(dev).float())
            p.append(torch.sigmoid(out["cls"].float().reshape(-1)).cpu())
            y.append(b.labels.cpu())
        if not p:
            return None, None
        return tr.auc_and_loss(torch.cat(y).numpy(), torch.cat(p).numpy())

    if rule is None:
        rule = tr.rule_from_profile({}, spec, "score", default_every=batches.per_epoch)
    criterion = tr.Criterion("val AUC of the ViT's classification sigma(cls); tie-break its BCE", val_cls)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        weights, info = tr.run_resumable(work, model, opt, iterations, step, 0.0, progress, every=every,
                                         criterion=criterion, rule=rule)
    info.update(batch=batch, lr=lr, weight_decay=WEIGHT_DECAY, lr_warmup_iterations=lr_warm,
                loss_warmup_iterations=warm, flips=bool(flips), bf16=bool(bf16), n_train=int(len(batches.idx)),
                last_terms=dict(log_terms))
    return weights, info


# ============================================================================ inference
def rcam_maps(vit: DiGViT, images: Tensor, flips: bool, size: int) -> Tensor:
    """rcams of x (+ flipped-back rcams of its flip), ReLU -> Up (bilinear) -> minmax: (B, S, S)."""
    r = vit(images)["rcams"]  # (B, 1, g, g)
    if flips:
        r = r + vit(images.flip(-1))["rcams"].flip(-1)
    return minmax(upsample(F.relu(r[:, 0].float()), size))


__all__ = ["DiG", "DiGViT", "LFCA", "dig_losses", "loss_pred", "loss_cons", "loss_pac", "bernoulli_kd", "max_norm",
           "diffusion_features", "denoised", "feature_dim", "build_feature_cache", "DiffusionInputs", "train_dig",
           "rcam_maps", "slice_noise"]
