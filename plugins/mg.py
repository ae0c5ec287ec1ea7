"""Mean gradient map (MG), docs/methods/diffusion.md: the noisy classifier's input gradients.

Network: the task's noisy classifier (docs/methods/diffusion.md), frozen, in eval.

Hyperparameters: ``t_ref`` = the profile's ``mg.t_ref`` (paper: 10, 20, ..., 200 on the
4000-step reference scale, matched to harness indices 2, 4, 7, ..., 49) [paper; mapping
inferred], or an explicit set such as ``mg[t_ref=10+20+30]``; ``t_scale=native`` takes them
as harness indices.

Map, per image, with one fixed seeded eps_t per t shared by all slices (component
``noise/mg/t=<t>``) [inferred]:

    x'_t = add_noise(2x - 1, eps_t, t)
    g_t  = d log softmax(f(x'_t, t))[1] / d x'_t          (positive class, noisy input)
    MG   = minmax( mean_t sum_c |g_t,c| )

Provenance: [paper] positive class, t-set, gradient w.r.t. the noisy input, mean over t;
[reference code] the log-softmax gradient (guided diffusion; CDM's visualize_gradient);
[inferred] the sum of absolute values over channels (``reduce=signed`` for comparison),
shared noise, minmax.  Mask: Otsu per image (docs/protocol.md section 6, ``mask_rule = "otsu"``).
One backward of the summed log-probabilities serves a batch (and several t at once): the
classifier treats samples independently in eval, so each sample gets its own gradient.

Memory: a pass holds at most ``MAX_BATCH`` = 128 noisy images with their autograd graph (two
timesteps of a 64-slice map batch at the paper profile).  When the device runs out of memory,
the pass is redone with half as many images, down to one, and the smaller size is kept for the
rest of the maps (a warning says so): the map is the same up to float rounding, because every
image's gradient is its own.  Neither the size nor a halving enters a cache key or a row name.
"""
from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Sequence

from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, SliceBatch
from wsss_bench.lazy import F, torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

    Tensor = _torch.Tensor

POSITIVE_CLASS = 1
REDUCTIONS = ("abs", "signed")
#: most noisy images per forward/backward (several timesteps are batched together)
MAX_BATCH = 128


def positive_log_prob(model, xt: "Tensor", t: "Tensor") -> "Tensor":
    """log softmax(f(x_t, t))[1] per image, (B,); half-precision logits are upcast to float32."""
    logits = model(xt, t)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=1)[:, POSITIVE_CLASS]


def input_gradients(model, xt: "Tensor", t: "Tensor") -> "Tensor":
    """g = d log p(1 | x_t) / d x_t for every image, (B, C, S, S); one backward."""
    with torch.enable_grad():
        x = xt.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(positive_log_prob(model, x, t).sum(), x)
    return g


def reduce_channels(g: "Tensor", reduce: str) -> "Tensor":
    """(..., C, S, S) -> (..., S, S): sum_c |g_c| [inferred] or the signed sum."""
    return g.abs().sum(dim=-3) if reduce == "abs" else g.sum(dim=-3)


class PassSize:
    """Images per forward/backward pass: starts at ``limit``, halved on out-of-memory."""

    def __init__(self, limit: int = MAX_BATCH) -> None:
        if int(limit) < 1:
            raise ValueError(f"mg: images per pass must be >= 1, got {limit}")
        self.limit = int(limit)
        self.halvings = 0

    def halve(self, err: BaseException) -> None:
        if self.limit == 1:
            raise err
        self.limit = max(1, self.limit // 2)
        self.halvings += 1
        warnings.warn(f"mg: out of memory on the device ({str(err).splitlines()[0][:120]}); redoing the pass with "
                      f"{self.limit} noisy images per forward/backward (the maps are the same up to float rounding)",
                      RuntimeWarning, stacklevel=2)


def is_out_of_memory(err: BaseException) -> bool:
    """A device allocator's out-of-memory error (CUDA, MPS, ...), not any other failure."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def mean_gradient(model, images: "Tensor", ts: Sequence[int], noises: Sequence["Tensor"], reduce: str = "abs",
                  profile=None, max_batch: "int | PassSize" = MAX_BATCH) -> "Tensor":
    """mean_t reduce_c(g_t), (B, S, S), before minmax; ``images`` (B, C, S, S) in [0, 1].

    ``noises[k]`` (1, C, S, S) is the fixed noise of harness timestep ``ts[k]``.  A pass
    holds at most ``max_batch`` noisy images: several timesteps of the whole batch when the
    batch is smaller, else a slice of the batch at one timestep.  ``max_batch`` may be a
    :class:`PassSize`, which out-of-memory errors halve (and which then stays halved).
    """
    from wsss_bench.nn.diffusion import add_noise, to_model_range

    size = max_batch if isinstance(max_batch, PassSize) else PassSize(max_batch)
    x0 = to_model_range(images)
    b = x0.shape[0]
    total = torch.zeros(x0.shape[0], *x0.shape[2:], dtype=x0.dtype, device=x0.device)
    k = 0
    while k < len(ts):
        per = max(1, size.limit // max(1, b))  # timesteps in this pass
        rows = min(b, size.limit)  # images of the batch per forward/backward
        group = list(ts[k:k + per])
        try:
            done = torch.zeros_like(total)  # added to the total only when the whole pass succeeded
            for r in range(0, b, rows):
                x = x0[r:r + rows]
                n = x.shape[0]
                t = torch.tensor(group, dtype=torch.long, device=x0.device).repeat_interleave(n)  # (G*n,)
                eps = torch.cat([noises[k + j].to(x0).expand_as(x) for j in range(len(group))])  # (G*n, C, S, S)
                xt = add_noise(x.repeat(len(group), 1, 1, 1), eps, t, profile)
                g = input_gradients(model, xt, t)
                done[r:r + n] += reduce_channels(g, reduce).view(len(group), n, *x0.shape[2:]).sum(0)
        except Exception as err:  # only out-of-memory is retried, with half the images
            if not is_out_of_memory(err):
                raise
            done = None  # noqa: F841 - free the partial pass before the smaller one
            size.halve(err)
            continue
        total += done
        k += len(group)
    return total / len(ts)


class MeanGradient(CamSource):
    name = "mg"
    version = "1"
    params = {"t_ref": "profile", "t_scale": "ref4000", "ref_schedule": "cosine", "reduce": "abs"}
    mask_rule = "otsu"
    description = "mean input gradient of the noisy classifier's log p(1) over t (CLDF's MG)"
    no_grad = False  # needs autograd w.r.t. the noisy input

    def validate(self) -> None:
        text = str(self.p["t_ref"]).strip()
        if text != "profile" and not re.fullmatch(r"\[?\s*\d+(\s*[+,]\s*\d+)*\s*\]?", text):
            raise self.bad_param("t_ref", "must be 'profile' or integers joined by '+', e.g. t_ref=10+20+30")
        if self.p["t_scale"] not in ("ref4000", "native"):
            raise self.bad_param("t_scale", "is not one of ref4000, native")
        if self.p["ref_schedule"] not in ("cosine", "linear"):
            raise self.bad_param("ref_schedule", "is not one of cosine, linear")
        if self.p["reduce"] not in REDUCTIONS:
            raise self.bad_param("reduce", f"is not one of {', '.join(REDUCTIONS)}")

    def t_ref(self, ctx: "RunContext") -> list[int]:
        """The quoted t-set: the parameter, or the profile's ``mg.t_ref`` for ``profile``."""
        text = str(self.p["t_ref"]).strip()
        if text == "profile":
            return [int(v) for v in ctx.profile.mg.t_ref]
        return [int(v) for v in re.findall(r"\d+", text)]

    def prepare(self, ctx: "RunContext") -> None:
        from wsss_bench.nn.diffusion import harness_timesteps, match_table
        from wsss_bench.nn.noisy_classifier import get_noisy_classifier

        self.ctx = ctx
        self.model = get_noisy_classifier(ctx)
        t_ref = self.t_ref(ctx)
        try:
            self.ts = harness_timesteps(t_ref, self.p["t_scale"], self.p["ref_schedule"], ctx.profile)
        except ValueError as err:
            raise self.bad_param("t_ref", str(err)) from None
        c, s = ctx.task.channels, int(ctx.data.image_size)
        self.noises = [torch.randn((1, c, s, s), generator=ctx.generator(f"noise/mg/t={t}")).to(ctx.device)
                       for t in self.ts]
        ctx.record("match/mg", match_table(t_ref, self.p["t_scale"], self.p["ref_schedule"], ctx.profile))
        self.pass_size = PassSize(MAX_BATCH)  # halved for the rest of the maps if the device runs out of memory

    def maps(self, batch: SliceBatch) -> "Tensor":
        from wsss_bench.maps import minmax

        images = batch.images.to(self.ctx.device).float()
        mg = mean_gradient(self.model, images, self.ts, self.noises, self.p["reduce"], self.ctx.profile,
                           max_batch=self.pass_size)
        return minmax(mg).detach()  # (B, S, S) in [0, 1]


@hookimpl
def register_cam_sources(register):
    register(MeanGradient)
