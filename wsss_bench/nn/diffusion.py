"""Diffusion core (docs/methods/diffusion.md): schedules, timestep matching and the CDM.

What lives here:

- the **harness schedule**: ``alphas_cumprod`` of MONAI's ``DDPMScheduler`` (T = 1000,
  cosine, epsilon prediction) and :func:`add_noise` (guided-diffusion's ``q_sample``);
- the **reference schedule** of the quoted timesteps (T_ref = 4000, cosine; ``linear`` for
  sensitivity runs) and :func:`match`, which maps a reference index to the harness index of
  the nearest noise level (section 1.1);
- the **conditional diffusion model** (section 1.2): :func:`build_cdm` from a profile's
  ``cdm_unet`` section, :func:`train_cdm` (epsilon-MSE, AdamW 1e-4, optional EMA) and
  :func:`get_cdm`, the task's shared CDM, trained once, cached as safetensors and resumed
  from its last checkpoint when a build was interrupted;
- the checkpointed training loop lives in :mod:`wsss_bench.nn.training` (re-exported here).

Every sampling loop elsewhere is written by hand with explicit alpha-bar values; MONAI's
``DDIMScheduler.set_timesteps/step`` is never used (its spacing changed between MONAI 1.5
and 1.6, docs/methods/diffusion.md pitfall 1).  Diffusion networks receive ``2x - 1``; timesteps are long
tensors of shape (B,).

Importing this module imports neither torch nor MONAI.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from wsss_bench.lazy import F, np, torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

    Tensor = _torch.Tensor

#: length of the reference schedule the CDM / CLDF timesteps are quoted on
T_REF = 4000
REF_SCHEDULES = ("cosine", "linear")
T_SCALES = ("ref4000", "native")
#: class-conditional UNet: two classes, label 1 = positive
NUM_CLASSES = 2


# ============================================================================ schedules
@lru_cache(maxsize=8)
def _harness_scheduler(num_train_timesteps: int, schedule: str):
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule,
                         prediction_type="epsilon")


def harness_scheduler(profile: Any = None):
    """The harness ``DDPMScheduler`` (T and schedule from ``profile.common``; 1000 / cosine)."""
    t, sched = _harness_spec(profile)
    return _harness_scheduler(t, sched)


def _harness_spec(profile: Any) -> tuple[int, str]:
    common = getattr(profile, "common", None) if profile is not None else None
    if common is None:
        return 1000, "cosine"
    return int(common.diffusion_timesteps), str(common.schedule)


def harness_alphas_cumprod(profile: Any = None) -> "Tensor":
    """alpha-bar[i] of the harness schedule, i = 0..T-1, float64 (a copy)."""
    return harness_scheduler(profile).alphas_cumprod.detach().to(torch.float64).clone()


@lru_cache(maxsize=8)
def _reference_ab(schedule: str, steps: int) -> tuple[float, ...]:
    if schedule == "cosine":
        # alpha-bar(i) = f((i+1)/T) / f(0), f(u) = cos^2((u + 0.008)/1.008 * pi/2), built as
        # guided-diffusion does: per-step betas clipped at 0.999, then a cumulative product.
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        out, prod = [], 1.0
        for i in range(steps):
            beta = min(1.0 - f((i + 1) / steps) / f(i / steps), 0.999)
            prod *= 1.0 - beta
            out.append(prod)
        return tuple(out)
    if schedule == "linear":
        # guided-diffusion's linear schedule, rescaled to ``steps``: betas 1e-4 .. 2e-2 at 1000.
        scale = 1000.0 / steps
        betas = np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
        return tuple(float(v) for v in np.cumprod(1.0 - betas))
    raise ValueError(f"ref_schedule={schedule!r}: choose one of {', '.join(REF_SCHEDULES)}")


def reference_alphas_cumprod(schedule: str = "cosine", steps: int = T_REF) -> "Tensor":
    """alpha-bar_ref(i), i = 0..steps-1, of the reference schedule, float64."""
    return torch.tensor(_reference_ab(schedule, steps), dtype=torch.float64)


def ref_alpha_bar(i: int, schedule: str = "cosine") -> float:
    """alpha-bar_ref(i) as a Python float; i = -1 gives 1 (the clean image)."""
    if i < 0:
        return 1.0
    return _reference_ab(schedule, T_REF)[int(i)]


def match(i_ref: int | Sequence[int], ref_schedule: str = "cosine", profile: Any = None) -> int | list[int]:
    """Harness index whose noise level is nearest to reference index ``i_ref`` (docs/methods/diffusion.md).

    ``argmin_j |ab[j] - ab_ref(i_ref)|``; ties go to the smaller j.  A sequence gives a list.
    """
    many = isinstance(i_ref, (list, tuple, range))
    refs = [int(i) for i in (i_ref if many else [i_ref])]
    bad = [i for i in refs if not 0 <= i < T_REF]
    if bad:
        raise ValueError(f"reference timesteps {bad} are outside [0, {T_REF - 1}]")
    ab = harness_alphas_cumprod(profile).numpy()  # (T,)
    ref = np.asarray(_reference_ab(ref_schedule, T_REF))[refs]  # (n,)
    out = np.abs(ab[None, :] - ref[:, None]).argmin(axis=1)  # numpy: first minimum on ties
    return [int(v) for v in out] if many else int(out[0])


def harness_timesteps(t_values: Sequence[int], t_scale: str = "ref4000", ref_schedule: str = "cosine",
                      profile: Any = None) -> list[int]:
    """Harness indices for quoted timesteps: matched (``ref4000``) or taken as is (``native``)."""
    if t_scale == "ref4000":
        return match(list(t_values), ref_schedule, profile)
    if t_scale == "native":
        t_max = _harness_spec(profile)[0]
        bad = [v for v in t_values if not 0 <= int(v) < t_max]
        if bad:
            raise ValueError(f"t_scale=native: timesteps {bad} are outside [0, {t_max - 1}]")
        return [int(v) for v in t_values]
    raise ValueError(f"t_scale={t_scale!r}: choose one of {', '.join(T_SCALES)}")


def match_table(t_values: Sequence[int], t_scale: str = "ref4000", ref_schedule: str = "cosine",
                profile: Any = None) -> dict[str, Any]:
    """The manifest record of a timestep mapping: every quoted t, its harness t, both noise levels."""
    ab = harness_alphas_cumprod(profile)
    ts = harness_timesteps(t_values, t_scale, ref_schedule, profile)
    rows = []
    for t_ref, t in zip(t_values, ts):
        row = {"t_ref": int(t_ref), "t": int(t), "alpha_bar": float(ab[t])}
        if t_scale == "ref4000":
            row["alpha_bar_ref"] = ref_alpha_bar(int(t_ref), ref_schedule)
        rows.append(row)
    t_max, sched = _harness_spec(profile)
    return {"t_scale": t_scale, "ref_schedule": ref_schedule, "t_ref_steps": T_REF,
            "harness": {"steps": t_max, "schedule": sched}, "rows": rows}


def timesteps(t: int, batch: int, device: Any = "cpu") -> "Tensor":
    """A timestep as the (B,) long tensor every diffusion network expects."""
    return torch.full((int(batch),), int(t), dtype=torch.long, device=device)


def add_noise(x0: "Tensor", eps: "Tensor", t: "Tensor", profile: Any = None) -> "Tensor":
    """sqrt(ab[t]) x0 + sqrt(1 - ab[t]) eps with the harness scheduler; ``t`` is (B,) long."""
    sched = harness_scheduler(profile)
    return sched.add_noise(original_samples=x0, noise=eps, timesteps=t.long())


def to_model_range(images: "Tensor") -> "Tensor":
    """[0, 1] images -> the [-1, 1] range every diffusion network receives [inferred]."""
    return images * 2.0 - 1.0


# ============================================================================ the CDM network
def unet_kwargs(spec: Mapping[str, Any], in_channels: int) -> dict[str, Any]:
    """DiffusionModelUNet arguments from a profile's ``cdm_unet`` section (docs/methods/diffusion.md)."""
    return dict(
        spatial_dims=2,
        in_channels=int(in_channels),
        out_channels=int(in_channels),
        channels=tuple(int(c) for c in spec["channels"]),
        num_res_blocks=int(spec["res_blocks"]),
        attention_levels=tuple(bool(a) for a in spec["attention"]),
        num_head_channels=int(spec["head_channels"]),
        norm_num_groups=int(spec["norm_groups"]),
        resblock_updown=True,  # [inferred]
        num_class_embeds=NUM_CLASSES,
    )


def build_cdm(spec: Mapping[str, Any], in_channels: int, seed: int | None = None):
    """A randomly initialised class-conditional ``DiffusionModelUNet``; ``seed`` leaves the global RNG alone."""
    from monai.networks.nets import DiffusionModelUNet

    kwargs = unet_kwargs(spec, in_channels)
    if seed is None:
        return DiffusionModelUNet(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2**63))
        return DiffusionModelUNet(**kwargs)


# ============================================================================ resumable training
# The loop and its helpers live in wsss_bench.nn.training (shared by every trained model);
# these names stay importable from here.
from wsss_bench.nn.training import (  # noqa: E402
    IterationBatches,
    checkpoint_every,
    iteration_generator,
    mix as _mix,
    random_flips,
    run_resumable,
)


# ============================================================================ CDM training
def train_cdm(model, data: Any, profile: Any, device: Any, seed: int, work: Path, flips: bool,
              bf16: bool = False, progress: Callable[[int], Any] | None = None,
              iterations: int | None = None, checkpoint_interval: int | None = None,
              ) -> tuple[dict[str, "Tensor"], dict[str, Any]]:
    """Epsilon-prediction training of the CDM on the train split (docs/methods/diffusion.md).

    x_t = add_noise(2x - 1, eps, t), t ~ U{0..T-1}; loss = MSE(unet(x_t, t, y), eps);
    AdamW; learning rate (paper 1e-4), batch, iterations and EMA decay from ``profile.cdm``;
    no label dropout.
    Left-right flips where the task allows them (BraTS) [inferred].
    """
    cfg = profile.cdm
    iterations = int(cfg.iterations if iterations is None else iterations)
    t_max = _harness_spec(profile)[0]
    dev = torch.device(device)
    model.to(dev)
    lr = float(cfg.lr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = IterationBatches(data, data.split("train"), int(cfg.batch), seed, dev)

    def step(it: int) -> float:
        b = batches.get(it)
        g = iteration_generator(seed, it)
        x0 = to_model_range(b.images.to(dev).float())  # (B, C, S, S) in [-1, 1]
        if flips:
            x0 = random_flips(x0, g)
        t = torch.randint(0, t_max, (x0.shape[0],), generator=g)  # (B,) long
        eps = torch.randn(x0.shape, generator=g)
        t, eps = t.to(dev), eps.to(dev)
        xt = add_noise(x0, eps, t, profile)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(xt, timesteps=t, class_labels=b.labels.to(dev).long())
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    weights, info = run_resumable(work, model, opt, iterations, step, float(cfg.ema), progress,
                                  every=checkpoint_interval)
    info.update(batch=int(cfg.batch), lr=lr, flips=bool(flips), bf16=bool(bf16),
                n_train=int(len(batches.idx)))
    return weights, info


def _this_module():
    return sys.modules[__name__]


def get_cdm(ctx: "RunContext"):
    """The task's CDM (EMA weights when the profile has EMA), a shared model: trained once per
    task and seed, cached as ``cdm.safetensors``, resumed from its last checkpoint when a
    build was interrupted, returned frozen, in eval, on ``ctx.device``, memoised.
    """
    spec, recipe = dict(ctx.profile.cdm_unet), dict(ctx.profile.cdm)

    def build():
        return build_cdm(spec, ctx.task.channels, seed=ctx.seed("init/cdm"))

    def train(model, run):
        return train_cdm(model, ctx.data, ctx.profile, run.device, run.seed, run.work, flips=ctx.task.flips,
                         bf16=ctx.bf16, progress=run.advance)

    params = {"unet": spec, "train": recipe, "schedule": list(_harness_spec(ctx.profile)),
              "image_size": int(ctx.data.image_size), "channels": int(ctx.task.channels)}
    model = ctx.shared_model("cdm", build, train, params=params, source=[_this_module()],
                             total=int(recipe["iterations"]))
    ctx.record("diffusion/schedule", {"harness": list(_harness_spec(ctx.profile)), "prediction": "epsilon",
                                      "cdm_weights": "ema" if float(recipe["ema"]) > 0 else "raw"})
    return model
