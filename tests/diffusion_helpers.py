"""Shared by the diffusion tests: fully random tiny networks, a fake run context, and
independent float64 references written from docs/methods/diffusion.md.

Why every parameter is randomised: MONAI zero-initialises the second convolution of every
res block, the attention output projections and the output convolution (``zero_module``).
A fresh DiffusionModelUNet's res blocks are then identities plus a skip, so its up-block
outputs depend on neither t nor the class label, and its eps is 0: a test on such a
network passes implementations that use the wrong t, the wrong label or no network at
all.  :func:`randomise_` gives every weight a random value of a sensible scale, and
:func:`assert_depends_on_t_and_label` proves the network can tell.

The references below never call the code under test (``plugins/`` and the functions of
``wsss_bench.nn`` they test); they use MONAI's own scheduler for the harness noise levels,
and plain loops for everything else.
"""
from __future__ import annotations

import copy
import hashlib
import math
from contextlib import nullcontext
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from wsss_bench.interfaces import SliceBatch
from wsss_bench.profiles import load_profile

SMOKE = load_profile("smoke")


# ---------------------------------------------------------------- random networks
def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (in place): matrices and kernels N(0, 1/fan_in), norm scales
    1 + N(0, 0.2^2), biases N(0, 0.2^2), class embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "class_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)).to(p.dtype))
            elif name.endswith("weight"):
                p.copy_((1 + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))
            else:
                p.copy_((0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))
    zero = [n for n, p in module.named_parameters() if not p.any()]
    assert not zero, f"parameters left at zero: {zero}"
    return module


def random_cdm(seed: int = 0, channels: int = 4, spec=None):
    """The smoke-profile CDM with every parameter random, eval, frozen."""
    from wsss_bench.nn import diffusion as dif

    unet = dif.build_cdm(spec or SMOKE.cdm_unet, channels, seed=seed)
    return randomise_(unet, seed + 1000).eval().requires_grad_(False)


def random_noisy_classifier(size: int, seed: int = 0, channels: int = 4):
    """The smoke-profile noisy classifier with every parameter random, eval, frozen."""
    from wsss_bench.nn import noisy_classifier as ncl

    model = ncl.build_noisy_classifier(SMOKE.cdm_unet, channels, size, seed=seed)
    return randomise_(model, seed + 2000).eval().requires_grad_(False)


def assert_depends_on_t_and_label(unet, size: int = 16, channels: int = 4) -> None:
    """The up-block outputs and eps change with t and with the label (else tests are blind)."""
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(7))
    outs = {}
    hook = unet.up_blocks[0].register_forward_hook(lambda m, i, o: outs.__setitem__("up0", o))

    def run(t, y):
        with torch.no_grad():
            eps = unet(x, timesteps=torch.full((2,), t, dtype=torch.long), class_labels=torch.full((2,), y))
        return eps, outs["up0"].clone()

    try:
        (e, a), (e_t, a_t), (e_y, a_y) = run(12, 1), run(0, 1), run(12, 0)
    finally:
        hook.remove()
    for other in (e_t, e_y):
        assert float((e - other).abs().max()) > 1e-2
    for other in (a_t, a_y):
        assert float((a - other).abs().max()) > 1e-2


# ---------------------------------------------------------------- a fake run context
class FakeContext:
    """What the diffusion plugins ask of a run context, and nothing else.

    ``generator(component)`` is seeded from sha256(seed, component), so two components never
    share a stream and a test can rebuild any plugin's noise from the documented component
    name alone.
    """

    def __init__(self, size: int = 16, channels: int = 4, profile=SMOKE, seed: int = 0) -> None:
        self.device = "cpu"
        self.bf16 = False
        self.profile = profile
        self.task = SimpleNamespace(task_id="brats", dataset="brats", channels=channels, flips=True)
        self.data = SimpleNamespace(image_size=size, fingerprint="fake", is_phantom=True)
        self.records: dict = {}
        self.base_seed = seed

    def seed(self, component: str) -> int:
        digest = hashlib.sha256(f"{self.base_seed}/{component}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % (2**63)

    def generator(self, component: str, device: str = "cpu") -> torch.Generator:
        return torch.Generator(device).manual_seed(self.seed(component))

    def record(self, key, value) -> None:
        self.records[key] = value

    def autocast(self):
        return nullcontext()


def slice_batch(images: torch.Tensor, first_z: int = 3) -> SliceBatch:
    n = images.shape[0]
    return SliceBatch(images=images, labels=torch.ones(n, dtype=torch.long), index=np.arange(n),
                      case_ids=[f"case{i}" for i in range(n)], z=[first_z + i for i in range(n)])


# ---------------------------------------------------------------- schedules (docs/methods/diffusion.md)
@lru_cache(maxsize=None)
def harness_ab() -> torch.Tensor:
    """alpha-bar of MONAI's DDPMScheduler(1000, cosine), straight from MONAI, float64."""
    from monai.networks.schedulers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, schedule="cosine", prediction_type="epsilon")
    return sched.alphas_cumprod.detach().to(torch.float64).clone()


@lru_cache(maxsize=None)
def _ref_ab_table() -> tuple[float, ...]:
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    out, prod = [], 1.0
    for i in range(4000):  # guided-diffusion's betas_for_alpha_bar, clipped at 0.999
        prod *= 1.0 - min(1.0 - f((i + 1) / 4000) / f(i / 4000), 0.999)
        out.append(prod)
    return tuple(out)


def ref_ab(i: int) -> float:
    """alpha-bar_ref(i) of the 4000-step cosine reference schedule; 1 for i = -1."""
    return 1.0 if i < 0 else _ref_ab_table()[i]


def ref_match(i: int) -> int:
    """argmin_j |ab[j] - ab_ref(i)|, first minimum on ties."""
    return int(torch.argmin((harness_ab() - ref_ab(i)).abs()))


def q_sample(x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """sqrt(ab[t]) x0 + sqrt(1 - ab[t]) eps on the harness schedule, float64."""
    a = float(harness_ab()[t])
    return math.sqrt(a) * x0.double() + math.sqrt(1 - a) * eps.double()


# ---------------------------------------------------------------- CDM saliency (docs/methods/diffusion.md)
def reference_cdm_difference(unet, x0: torch.Tensor, noise: torch.Tensor, tau: float = 0.95, q: int = 400,
                             steps: int = 10, guidance_scale: float = 0.0, classifier=None,
                             stats: dict | None = None) -> torch.Tensor:
    """acc = sum_k (x1_k - x2_k) of Algorithm 1, float64, for x0 in [-1, 1].

    The perturbed branch is the reference code's way: a cloned UNet whose row 0 of the
    class embedding is tau E[1] + (1 - tau) E[0], called with label 0.  Each step is
    guided-diffusion's ``ddim_sample`` (eta = 0, clip_denoised) with, when guided,
    ``condition_score`` on the re-derived eps; y = 1 for branch 1, y = 0 for branch 2.
    ``stats['clipped']`` counts the x0 predictions the clip changed.
    """
    main = copy.deepcopy(unet).double().eval()
    perturbed = copy.deepcopy(main)
    with torch.no_grad():
        e = main.class_embedding.weight
        perturbed.class_embedding.weight[0] = tau * e[1] + (1 - tau) * e[0]
    clf = copy.deepcopy(classifier).double().eval() if classifier is not None else None
    b = x0.shape[0]
    x0, noise = x0.double(), noise.double()
    x1 = math.sqrt(ref_ab(q)) * x0 + math.sqrt(1 - ref_ab(q)) * noise
    x2 = x1.clone()
    acc = torch.zeros_like(x0)
    clipped = 0
    for k in range(1, steps + 1):
        i = q - k
        a, a_prev = ref_ab(i), ref_ab(i - 1)
        t = torch.full((b,), ref_match(i), dtype=torch.long)
        new = []
        for net, x, y in ((main, x1, 1), (perturbed, x2, 0)):
            with torch.no_grad():
                eps = net(x, timesteps=t, class_labels=torch.full((b,), y, dtype=torch.long))
            raw = x / math.sqrt(a) - math.sqrt(1 / a - 1) * eps  # _predict_xstart_from_eps
            x0h = raw.clamp(-1, 1)
            clipped += int((raw != x0h).sum())
            eps = (x / math.sqrt(a) - x0h) / math.sqrt(1 / a - 1)  # _predict_eps_from_xstart
            if guidance_scale:
                with torch.enable_grad():
                    xin = x.detach().requires_grad_(True)
                    logp = torch.log_softmax(clf(xin, t), dim=-1)[:, y].sum()
                    grad = torch.autograd.grad(logp, xin)[0] * guidance_scale  # cond_fn
                eps = eps - math.sqrt(1 - a) * grad
                x0h = x / math.sqrt(a) - math.sqrt(1 / a - 1) * eps  # condition_score's pred_xstart
            new.append(x0h * math.sqrt(a_prev) + math.sqrt(1 - a_prev) * eps)
        x1, x2 = new
        acc += x1 - x2
    if stats is not None:
        stats["clipped"] = clipped
    return acc


def reference_cdm_map(acc: torch.Tensor) -> torch.Tensor:
    """minmax(sum_c |acc_c|) per image, float64."""
    m = acc.abs().sum(1)
    flat = m.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (m - lo) / (hi - lo)


# ---------------------------------------------------------------- features (docs/methods/diffusion.md)
def reference_features(unet, images: torch.Tensor, ts, noises, blocks, size: int, label: int = 1) -> torch.Tensor:
    """mean_t concat_l Up(output of up_blocks[l]) for x_t = q_sample(2x - 1, eps_t, t), float64 (B, D, S, S)."""
    net = copy.deepcopy(unet).double().eval()
    b = images.shape[0]
    per_t = []
    for t, eps in zip(ts, noises):
        outs = {}
        hooks = [net.up_blocks[i].register_forward_hook(lambda m, inp, out, i=i: outs.__setitem__(i, out))
                 for i in blocks]
        xt = q_sample(images.double() * 2 - 1, eps.double().expand(b, -1, -1, -1), t)
        with torch.no_grad():
            net(xt, timesteps=torch.full((b,), t, dtype=torch.long), class_labels=torch.full((b,), label))
        for h in hooks:
            h.remove()
        per_t.append(torch.cat([F.interpolate(outs[i], size=(size, size), mode="bilinear", align_corners=False)
                                for i in blocks], dim=1))
    return torch.stack(per_t).mean(0)


# ---------------------------------------------------------------- MG (docs/methods/diffusion.md)
def reference_mean_gradient(model, images: torch.Tensor, ts, noises, h: float = 1e-6) -> torch.Tensor:
    """mean_t sum_c |d log softmax(f(x_t, t))[1] / d x_t| by central differences, float64 (B, S, S)."""
    net = copy.deepcopy(model).double().eval()
    b, c, s, _ = images.shape
    total = torch.zeros(b, s, s, dtype=torch.float64)
    basis = torch.eye(c * s * s, dtype=torch.float64).view(-1, c, s, s) * h  # (C S S, C, S, S)
    for t, eps in zip(ts, noises):
        xt = q_sample(images.double() * 2 - 1, eps.double().expand(b, -1, -1, -1), t)
        for j in range(b):
            tt = torch.full((basis.shape[0],), t, dtype=torch.long)
            with torch.no_grad():
                up = torch.log_softmax(net(xt[j:j + 1] + basis, tt), dim=1)[:, 1]
                down = torch.log_softmax(net(xt[j:j + 1] - basis, tt), dim=1)[:, 1]
            g = ((up - down) / (2 * h)).view(c, s, s)
            total[j] += g.abs().sum(0)
    return total / len(ts)
