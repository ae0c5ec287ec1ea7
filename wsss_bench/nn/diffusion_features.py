"""Diffusion features without dense feature maps (docs/methods/diffusion.md).

F = mean_t concat_l Up(a_{l,t}), where a_{l,t} is the output of ``unet.up_blocks[l]`` for
the noisy input x_t = add_noise(2x - 1, eps_t, t) with class label 1.  Up is linear and
the same for every t, so the mean over t is taken at each block's native resolution first
(:func:`mean_activations`, exactly equal).  The (B, D, S, S) tensor is never built:

- :func:`gather_from` samples the native-resolution activations at chosen pixels with
  ``grid_sample(bilinear, border, align_corners=False)`` at x = (2j+1)/S - 1,
  y = (2i+1)/S - 1, which equals Up followed by indexing;
- :func:`stream_from` walks one image's pixels in chunks, so memory is O(chunk * D);
- :func:`stream_embed` applies a per-pixel function (the CLDF decoder) chunk by chunk into
  an (S^2, out) buffer.

Blocks (:func:`select_blocks`): the profile's ``cldf.feature_blocks`` is ``all``,
``up a-b`` / ``up a,b`` (explicit up-block indices) or ``auto``, the the spec rule: up blocks
whose output resolution r satisfies S/8 <= r <= S/2, or all blocks if fewer than two
qualify.  Importing this module does not import torch.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from wsss_bench.lazy import F, torch
from wsss_bench.nn.diffusion import add_noise, timesteps, to_model_range

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    Tensor = _torch.Tensor

#: docs/methods/diffusion.md: pixels per streamed chunk
DEFAULT_CHUNK = 16384


# ============================================================================ which blocks
def up_block_channels(spec: Mapping[str, Any]) -> list[int]:
    """Output channels of ``up_blocks[i]`` of a DiffusionModelUNet with ``spec['channels']``."""
    return [int(c) for c in reversed(list(spec["channels"]))]


def up_block_resolutions(n_levels: int, image_size: int) -> list[int]:
    """Output side length of each up block: every block but the last upsamples by 2."""
    deepest = image_size // 2 ** (n_levels - 1)
    return [deepest * 2 ** (i + 1) if i < n_levels - 1 else image_size for i in range(n_levels)]


def select_blocks(rule: str, spec: Mapping[str, Any], image_size: int) -> list[int]:
    """Up-block indices for ``rule`` (``all``, ``auto`` or ``up a-b`` / ``up a,b,...``)."""
    n = len(spec["channels"])
    rule = str(rule).strip().lower()
    if rule == "all":
        return list(range(n))
    if rule == "auto":
        res = up_block_resolutions(n, image_size)
        chosen = [i for i, r in enumerate(res) if image_size / 8 <= r <= image_size / 2]
        return chosen if len(chosen) >= 2 else list(range(n))
    m = re.fullmatch(r"up\s+(\d+)\s*-\s*(\d+)", rule)
    if m:
        blocks = list(range(int(m.group(1)), int(m.group(2)) + 1))
    elif re.fullmatch(r"up\s+\d+(\s*,\s*\d+)*", rule):
        blocks = [int(v) for v in rule[2:].split(",")]
    else:
        raise ValueError(f"feature blocks {rule!r}: use 'all', 'auto', 'up A-B' or 'up A,B,...'")
    if not blocks or min(blocks) < 0 or max(blocks) >= n:
        raise ValueError(f"feature blocks {rule!r}: the UNet has up blocks 0..{n - 1}")
    return sorted(set(blocks))


def feature_dim(spec: Mapping[str, Any], blocks: Sequence[int]) -> int:
    """D = sum of the chosen up blocks' channels (paper: 512 + 256 + 256 = 1024)."""
    ch = up_block_channels(spec)
    return int(sum(ch[i] for i in blocks))


# ============================================================================ activations
class _StopForward(Exception):
    """Raised by the hook of the deepest needed block: later blocks are never computed."""


def block_activations(unet, x: "Tensor", t: "Tensor", labels: "Tensor", blocks: Sequence[int]) -> list["Tensor"]:
    """Outputs of ``unet.up_blocks[i]`` for i in ``blocks`` (one forward, stopped early)."""
    found: dict[int, "Tensor"] = {}
    last = max(blocks)
    handles = []

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            found[i] = output
            if i == last:
                raise _StopForward

        return hook

    try:
        for i in blocks:
            handles.append(unet.up_blocks[i].register_forward_hook(hook_for(i)))
        try:
            unet(x, timesteps=t, class_labels=labels)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    return [found[i] for i in blocks]


def mean_activations(unet, images: "Tensor", ts: Sequence[int], noises: Sequence["Tensor"], blocks: Sequence[int],
                     label: int = 1, profile: Any = None, autocast: Callable[[], Any] | None = None) -> list["Tensor"]:
    """a-bar_l = mean_t a_{l,t} at native resolution: [(B, C_l, h_l, w_l)] float32.

    ``images`` (B, C, S, S) in [0, 1]; ``noises[k]`` (1, C, S, S) is the fixed noise of
    ``ts[k]``, shared by all images (Baranchuk's share_noise).
    """
    x0 = to_model_range(images.float())
    b, dev = x0.shape[0], x0.device
    labels = torch.full((b,), int(label), dtype=torch.long, device=dev)
    acc: list["Tensor"] | None = None
    with torch.no_grad():
        for t, eps in zip(ts, noises):
            tt = timesteps(t, b, dev)
            xt = add_noise(x0, eps.to(dev).expand_as(x0), tt, profile)
            with (autocast() if autocast is not None else nullcontext()):
                acts = block_activations(unet, xt, tt, labels, blocks)
            acts = [a.float() for a in acts]
            acc = acts if acc is None else [s.add_(a) for s, a in zip(acc, acts)]
    assert acc is not None, "mean_activations needs at least one timestep"
    return [a.div_(len(ts)) for a in acc]


# ============================================================================ gather / stream
def pixel_grid(rows: "Tensor", cols: "Tensor", size: int) -> "Tensor":
    """(1, 1, n, 2) grid_sample coordinates of pixel centres (align_corners=False)."""
    x = (2.0 * cols.double() + 1.0) / size - 1.0
    y = (2.0 * rows.double() + 1.0) / size - 1.0
    return torch.stack([x, y], dim=-1).float().view(1, 1, -1, 2)


def gather_from(acts: Sequence["Tensor"], coords: "Tensor", size: int) -> "Tensor":
    """Features (N, D) at ``coords`` (N, 3) = (batch index, row, column) of S x S images.

    Equal to ``concat_l Up(acts_l)[b, :, i, j]`` without building the upsampled maps.
    """
    coords = coords.long().to(acts[0].device)
    n = coords.shape[0]
    dim = sum(a.shape[1] for a in acts)
    out = acts[0].new_empty((n, dim))
    for b in torch.unique(coords[:, 0]).tolist():
        pos = torch.nonzero(coords[:, 0] == b).flatten()
        grid = pixel_grid(coords[pos, 1], coords[pos, 2], size)  # (1, 1, n_b, 2)
        parts = [F.grid_sample(a[b:b + 1], grid, mode="bilinear", padding_mode="border",
                               align_corners=False)[0, :, 0, :]  # (C_l, n_b)
                 for a in acts]
        out[pos] = torch.cat(parts, dim=0).t()
    return out


def stream_from(acts: Sequence["Tensor"], size: int, chunk: int = DEFAULT_CHUNK,
                gather: Callable[..., "Tensor"] | None = None) -> Iterator[tuple[slice, "Tensor"]]:
    """(flat pixel range, features (n <= chunk, D)) over one image's activations (1, C_l, h, w)."""
    gather = gather or gather_from
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dev = acts[0].device
    total = size * size
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        flat = torch.arange(start, stop, device=dev)
        coords = torch.stack([torch.zeros_like(flat), flat // size, flat % size], dim=1)  # (n, 3)
        yield slice(start, stop), gather(acts, coords, size)


def stream_embed(stream: Iterator[tuple[slice, "Tensor"]], n_pixels: int, fn: Callable[["Tensor"], "Tensor"],
                 out_dim: int) -> "Tensor":
    """Apply ``fn`` (n, D) -> (n, out_dim) to every streamed chunk; (n_pixels, out_dim) buffer."""
    buf = None
    with torch.no_grad():
        for sl, feats in stream:
            z = fn(feats)
            if buf is None:
                buf = z.new_empty((n_pixels, out_dim))
            buf[sl] = z
    assert buf is not None, "empty stream"
    return buf


def dense_features(acts: Sequence["Tensor"], size: int) -> "Tensor":
    """The naive (B, D, S, S) map: Up every block and concatenate.  Tests and benchmarks only."""
    return torch.cat([F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False) for a in acts], 1)


def feature_noise(ctx: Any, t: int, size: int) -> "Tensor":
    """The fixed noise eps_t (1, C, S, S) of harness timestep ``t`` shared by every image and by
    every diffusion-feature backbone (``cdm``, ``unet-encoder``): component
    ``noise/features/t=<t>``, drawn on the CPU so it is identical on every device [inferred]."""
    g = ctx.generator(f"noise/features/t={t}")
    return torch.randn((1, ctx.task.channels, size, size), generator=g).to(ctx.device)
