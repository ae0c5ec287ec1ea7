"""CDM saliency (Hu et al. 2023, Algorithm 1; xhu248/cond_ddpm_wsss), docs/methods/diffusion.md.

Network: the task's shared CDM (docs/methods/diffusion.md), frozen; EMA weights where the profile has EMA.

Hyperparameters [reference code]: tau = 0.95, Q_ref = 400 on the 4000-step reference
schedule, R = 10 deterministic DDIM steps (eta = 0).

Map, per image, with ab(i) = alpha-bar_ref(i) and a seeded eps per slice
(component ``noise/cdm/<case>/<z>``):

    e_tau = tau E[1] + (1 - tau) E[0]           E = unet.class_embedding.weight
    x1 = x2 = sqrt(ab(Q)) x0 + sqrt(1 - ab(Q)) eps          (the same noisy image)
    for k = 1..R:   i = Q - k,  t = match(i)                 (first step told 399 at 400)
        e1 = unet(x1, t, y=1);  e2 = unet with e_tau (x2, t)
        per branch: x0h = clamp((x - sqrt(1-ab(i)) e) / sqrt(ab(i)), -1, 1)
                    e'  = (x - sqrt(ab(i)) x0h) / sqrt(1 - ab(i))
                    x   = sqrt(ab(i-1)) x0h + sqrt(1 - ab(i-1)) e'
        acc += x1 - x2
    map = sum_c |acc_c|  (``reduce=signed``: sum_c acc_c, the reference)  -> minmax

Mask: Otsu per image on the min-max map (docs/protocol.md section 6, ``mask_rule = "otsu"``).
Classifier guidance is off (Algorithm 1 has none).  ``guidance_scale`` s > 0 guides each
branch as guided-diffusion's ``ddim_sample`` + ``condition_score`` do, with the task's
noisy classifier f and y = 1 for branch 1, y = 0 for the perturbed branch: the guidance
acts on the *re-derived* eps (after clipping), and x0 is re-derived from the guided eps
without a second clip:

    e''  = e' - sqrt(1 - ab(i)) s grad_x log softmax(f(x, t))[y]
    x0h' = (x - sqrt(1 - ab(i)) e'') / sqrt(ab(i))
    x    = sqrt(ab(i-1)) x0h' + sqrt(1 - ab(i-1)) e''

The 1/(1 - tau) factor of the reference vanishes in minmax.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterator

from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, SliceBatch
from wsss_bench.lazy import F, torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

    Tensor = _torch.Tensor

REDUCTIONS = ("abs", "signed")
REF_SCHEDULES = ("cosine", "linear")


# ---------------------------------------------------------------- the perturbed embedding
@lru_cache(maxsize=None)
def _constant_embedding_class():
    class ConstantEmbedding(torch.nn.Module):
        """Stands in for ``unet.class_embedding``: the same vector for every label."""

        def __init__(self, vector: "Tensor") -> None:
            super().__init__()
            self.register_buffer("vector", vector)

        def forward(self, labels: "Tensor") -> "Tensor":
            return self.vector.expand(labels.shape[0], -1)  # (B, E)

    return ConstantEmbedding


@contextmanager
def class_embedding_swapped(unet, vector: "Tensor") -> Iterator[None]:
    """Temporarily make ``unet`` use the embedding ``vector`` for every class label."""
    original = unet.class_embedding
    unet.class_embedding = _constant_embedding_class()(vector.detach())
    try:
        yield
    finally:
        unet.class_embedding = original


def perturbed_embedding(unet, tau: float) -> "Tensor":
    """e_tau = tau E[1] + (1 - tau) E[0]; exactly E[1] when tau = 1."""
    emb = unet.class_embedding.weight.detach()
    return tau * emb[1] + (1.0 - tau) * emb[0]


# ---------------------------------------------------------------- Algorithm 1
def ddim_step(x: "Tensor", eps: "Tensor", ab_i: float, ab_prev: float, guide: "Tensor | None" = None) -> "Tensor":
    """One eta = 0 DDIM step from noise level ab_i to ab_prev, x0 clipped, eps re-derived.

    ``guide`` = s grad_x log p(y | x_t) turns it into guided-diffusion's conditioned step:
    the re-derived eps is shifted by -sqrt(1 - ab_i) guide and x0 re-derived from it.
    """
    x0h = ((x - (1.0 - ab_i) ** 0.5 * eps) / ab_i ** 0.5).clamp(-1.0, 1.0)
    eps2 = (x - ab_i ** 0.5 * x0h) / (1.0 - ab_i) ** 0.5
    if guide is not None:  # condition_score: on the re-derived eps; x0 not clipped again
        eps2 = eps2 - (1.0 - ab_i) ** 0.5 * guide
        x0h = (x - (1.0 - ab_i) ** 0.5 * eps2) / ab_i ** 0.5
    return ab_prev ** 0.5 * x0h + (1.0 - ab_prev) ** 0.5 * eps2


def guidance_gradient(x: "Tensor", t: "Tensor", scale: float, classifier, label: int) -> "Tensor":
    """s grad_x log softmax(f(x, t))[label], (B, C, S, S): guided-diffusion's ``cond_fn``."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = classifier(xg, t)
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)[:, label].sum()
        (grad,) = torch.autograd.grad(logp, xg)
    return scale * grad.to(x.dtype)


def cdm_difference(unet, x0: "Tensor", noise: "Tensor", tau: float, q_ref: int, steps: int,
                   ab: Callable[[int], float], match: Callable[[int], int], guidance_scale: float = 0.0,
                   classifier=None, autocast: Callable | None = None) -> "Tensor":
    """acc = sum_k (x1_k - x2_k), (B, C, S, S): Algorithm 1 on images ``x0`` in [-1, 1]."""
    import contextlib

    b, dev = x0.shape[0], x0.device
    ones = torch.ones(b, dtype=torch.long, device=dev)
    e_tau = perturbed_embedding(unet, tau)
    amp = autocast or contextlib.nullcontext
    x1 = ab(q_ref) ** 0.5 * x0 + (1.0 - ab(q_ref)) ** 0.5 * noise
    x2 = x1.clone()  # both branches start from the identical noisy image
    acc = torch.zeros_like(x0)
    for k in range(1, steps + 1):
        i = q_ref - k
        t = torch.full((b,), match(i), dtype=torch.long, device=dev)  # (B,) long
        with torch.no_grad(), amp():
            e1 = unet(x1, timesteps=t, class_labels=ones).float()
            with class_embedding_swapped(unet, e_tau):
                e2 = unet(x2, timesteps=t, class_labels=ones).float()
        g1 = g2 = None
        if guidance_scale:
            g1 = guidance_gradient(x1, t, guidance_scale, classifier, label=1)
            g2 = guidance_gradient(x2, t, guidance_scale, classifier, label=0)
        x1 = ddim_step(x1, e1, ab(i), ab(i - 1), g1)
        x2 = ddim_step(x2, e2, ab(i), ab(i - 1), g2)
        acc += x1 - x2
    return acc


def reduce_channels(acc: "Tensor", reduce: str) -> "Tensor":
    """(B, C, S, S) -> (B, S, S): sum of absolute values [inferred] or signed sum [reference]."""
    return acc.abs().sum(dim=1) if reduce == "abs" else acc.sum(dim=1)


# ---------------------------------------------------------------- the plugin
class CDMSaliency(CamSource):
    name = "cdm"
    version = "2"  # 2: guidance acts on the re-derived eps (guided-diffusion's condition_score)
    params = {"tau": 0.95, "q_ref": 400, "steps": 10, "reduce": "abs", "guidance_scale": 0.0,
              "ref_schedule": "cosine"}
    mask_rule = "otsu"
    description = "CDM saliency (Hu 2023 Alg. 1): DDIM difference between the y=1 and interpolated embedding"

    def validate(self) -> None:
        if not 0.0 <= self.p["tau"] <= 1.0:
            raise self.bad_param("tau", "must lie in [0, 1]")
        if self.p["reduce"] not in REDUCTIONS:
            raise self.bad_param("reduce", f"is not one of {', '.join(REDUCTIONS)}")
        if self.p["ref_schedule"] not in REF_SCHEDULES:
            raise self.bad_param("ref_schedule", f"is not one of {', '.join(REF_SCHEDULES)}")
        if not 1 <= self.p["steps"] <= self.p["q_ref"]:
            raise self.bad_param("steps", "must lie in [1, q_ref]")
        if not 1 <= self.p["q_ref"] < 4000:
            raise self.bad_param("q_ref", "must lie in [1, 3999] (reference 4000-step scale)")
        if self.p["guidance_scale"] < 0:
            raise self.bad_param("guidance_scale", "must be >= 0")
        # the runner wraps maps() in no_grad unless guidance needs input gradients
        self.no_grad = self.p["guidance_scale"] == 0

    def prepare(self, ctx: "RunContext") -> None:
        from wsss_bench.nn.diffusion import get_cdm, match, match_table, ref_alpha_bar

        self.ctx = ctx
        self.unet = get_cdm(ctx)
        self.classifier = None
        if self.p["guidance_scale"] > 0:
            from wsss_bench.nn.noisy_classifier import get_noisy_classifier

            self.classifier = get_noisy_classifier(ctx)
        sched, q = self.p["ref_schedule"], int(self.p["q_ref"])
        refs = list(range(q, q - int(self.p["steps"]) - 1, -1))  # Q, Q-1, ..., Q-R
        table = dict(zip(refs, match(refs, sched, ctx.profile)))
        self.ab = lambda i: ref_alpha_bar(i, sched)
        self.match = table.__getitem__
        ctx.record("match/cdm", match_table(refs, "ref4000", sched, ctx.profile))

    def noise(self, batch: SliceBatch) -> "Tensor":
        """One seeded eps per slice, drawn on the CPU (identical on every device)."""
        c, s = batch.images.shape[1], batch.images.shape[-1]
        eps = [torch.randn((c, s, s), generator=self.ctx.generator(f"noise/cdm/{case}/{z}"))
               for case, z in zip(batch.case_ids, batch.z)]
        return torch.stack(eps).to(batch.images.device)

    def maps(self, batch: SliceBatch) -> "Tensor":
        from wsss_bench.maps import minmax
        from wsss_bench.nn.diffusion import to_model_range

        x0 = to_model_range(batch.images.to(self.ctx.device).float())
        acc = cdm_difference(self.unet, x0, self.noise(batch).to(x0.device), float(self.p["tau"]),
                             int(self.p["q_ref"]), int(self.p["steps"]), self.ab, self.match,
                             float(self.p["guidance_scale"]), self.classifier, self.ctx.autocast)
        return minmax(reduce_channels(acc, self.p["reduce"]))  # (B, S, S) in [0, 1]


@hookimpl
def register_cam_sources(register):
    register(CDMSaliency)
