"""The external noisy classifier (docs/methods/diffusion.md): the CDM's encoder without conditioning.

"The same backbone as the CDM encoder, without conditioning" [paper].  It is MONAI's
``DiffusionModelEncoder`` (imported from ``monai.networks.nets.diffusion_model_unet``; it
is not exported from ``monai.networks.nets``) with the CDM's widths, res blocks, attention
levels and head channels, no class embedding, and two changes:

- the head: MONAI 1.5 hard-codes flatten + ``Linear(4096, 512)`` and 1.6 sizes that layer
  from ``input_shape``; both are replaced by GroupNorm -> SiLU -> global average pool ->
  ``Linear(channels[-1], 2)``, which works at any image size;
- ``forward(x, t)`` takes the noisy image and the (B,) long timesteps only, and
  ``features(x, t)`` returns every down block's output (the Table 2 "UNet encoder" row).

Constructor arguments are filtered against the installed MONAI signature, so 1.5 and 1.6
both build it [inferred].  Training: x_t = add_noise(2x - 1, eps, t) with t ~ U{0..T-1},
cross-entropy on the image label, AdamW lr 3e-4 [paper], weight decay 0 [reference code],
iterations and batch from ``profile.noisy_classifier``; the last checkpoint is kept.

Importing this module imports MONAI (the class derives from a MONAI class): plugins import
it inside ``prepare``.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder, get_timestep_embedding
from torch import nn

from wsss_bench.nn import diffusion as dif
from wsss_bench.nn.training import Criterion, auc_and_loss, rule_from_profile, rule_params

if TYPE_CHECKING:  # pragma: no cover
    from wsss_bench.context import RunContext

LR = 3e-4
WEIGHT_DECAY = 0.0
NUM_CLASSES = 2


def encoder_kwargs(spec: Mapping[str, Any], in_channels: int, image_size: int) -> dict[str, Any]:
    """DiffusionModelEncoder arguments for the CDM's widths, filtered to the installed signature."""
    wanted = dict(
        spatial_dims=2,
        in_channels=int(in_channels),
        out_channels=NUM_CLASSES,
        input_shape=(int(image_size), int(image_size)),  # MONAI >= 1.6 only
        channels=tuple(int(c) for c in spec["channels"]),
        num_res_blocks=int(spec["res_blocks"]),
        attention_levels=tuple(bool(a) for a in spec["attention"]),
        num_head_channels=int(spec["head_channels"]),
        norm_num_groups=int(spec["norm_groups"]),
        resblock_updown=True,  # as the CDM [inferred]
        num_class_embeds=None,
        with_conditioning=False,
    )
    accepted = inspect.signature(DiffusionModelEncoder.__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


class NoisyClassifier(DiffusionModelEncoder):
    """DiffusionModelEncoder with a pooled head; ``forward(x_t, t)`` gives 2 logits."""

    def __init__(self, spec: Mapping[str, Any], in_channels: int, image_size: int) -> None:
        super().__init__(**encoder_kwargs(spec, in_channels, image_size))
        width, groups = int(spec["channels"][-1]), int(spec["norm_groups"])
        self.out = nn.Sequential(  # replaces MONAI's flatten + Linear(h*w*C, 512) head
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, NUM_CLASSES),
        )

    def _embedding(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t_emb = get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype)
        return self.time_embed(t_emb)  # (B, 4 * channels[0])

    def features(self, x: torch.Tensor, timesteps: torch.Tensor) -> list[torch.Tensor]:
        """Every down block's output, shallow to deep: [(B, c_i, S / 2^(i+1), S / 2^(i+1))]."""
        emb = self._embedding(x, timesteps)
        h = self.conv_in(x)
        outs = []
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb, context=None)
            outs.append(h)
        return outs

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, 2) logits of the noisy image ``x`` (in [-1, 1] scale) at harness timesteps (B,)."""
        return self.out(self.features(x, timesteps)[-1])


def build_noisy_classifier(spec: Mapping[str, Any], in_channels: int, image_size: int,
                           seed: int | None = None) -> NoisyClassifier:
    """A randomly initialised noisy classifier; ``seed`` leaves the global RNG alone."""
    if seed is None:
        return NoisyClassifier(spec, in_channels, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2**63))
        return NoisyClassifier(spec, in_channels, image_size)


def feature_dim(spec: Mapping[str, Any]) -> int:
    """Channels of ``features`` concatenated (Table 2: 1792 at paper widths)."""
    return int(sum(int(c) for c in spec["channels"]))


def train_noisy_classifier(model: NoisyClassifier, data: Any, profile: Any, device: Any, seed: int,
                           work: Path, flips: bool, bf16: bool = False,
                           progress: Callable[[int], Any] | None = None,
                           iterations: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Cross-entropy on noised inputs at uniform t (docs/methods/diffusion.md); resumable like the CDM.

    ``noisy_classifier.iterations`` is the step cap: the convergence rule scores the AUC of
    p(1) on the validation slices noised at every timestep of the profile's MG t-set (pooled,
    fixed noise; tie-break the cross-entropy) every ``eval_every`` steps, keeps the best
    weights and stops on a plateau.
    """
    cfg = profile.noisy_classifier
    iterations = int(cfg.iterations if iterations is None else iterations)
    t_max = int(dif.harness_scheduler(profile).num_train_timesteps)
    dev = torch.device(device)
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    batches = dif.IterationBatches(data, data.split("train"), int(cfg.batch), seed, dev)

    def step(it: int) -> float:
        b = batches.get(it)
        g = dif.iteration_generator(seed, it)
        x0 = dif.to_model_range(b.images.to(dev).float())  # (B, C, S, S)
        if flips:
            x0 = dif.random_flips(x0, g)
        t = torch.randint(0, t_max, (x0.shape[0],), generator=g).to(dev)  # (B,) long
        eps = torch.randn(x0.shape, generator=g).to(dev)
        xt = dif.add_noise(x0, eps, t, profile)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(xt, t)
        loss = F.cross_entropy(logits.float(), b.labels.to(dev).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    val_idx = data.split("val")
    t_set = [int(t) for t in dif.match(list(profile.mg.t_ref), profile=profile)]

    def evaluate(m) -> tuple[float | None, float | None]:
        p_all, y_all = [], []
        for k, t in enumerate(t_set):
            p1, labels = noisy_scores(m, data, val_idx, t, seed=dif._mix(seed, 4, k), batch=int(cfg.batch),
                                      profile=profile)
            p_all.append(p1)
            y_all.append(labels)
        if not p_all:
            return None, None
        return auc_and_loss(np.concatenate(y_all), np.concatenate(p_all))

    criterion = Criterion(f"val AUC of p(1) on val slices noised at the MG t-set (harness t {t_set}); "
                          f"tie-break its cross-entropy", evaluate)
    rule = rule_from_profile(profile, cfg, "score", default_every=max(1, iterations // 10))
    weights, info = dif.run_resumable(work, model, opt, iterations, step, 0.0, progress, criterion=criterion,
                                      rule=rule)
    info.update(batch=int(cfg.batch), lr=LR, weight_decay=WEIGHT_DECAY, flips=bool(flips), bf16=bool(bf16),
                n_train=int(len(batches.idx)), t_set=t_set)
    return weights, info


@torch.no_grad()
def noisy_scores(model: NoisyClassifier, data: Any, idx, t: int, seed: int, batch: int = 32,
                 profile: Any = None) -> tuple[Any, Any]:
    """(softmax p(1), labels) on slices ``idx`` noised at harness index ``t`` (seeded noise)."""
    dev = next(model.parameters()).device
    model.eval()
    probs, labels = [], []
    for k, b in enumerate(data.batches(idx, batch, shuffle=False, device=str(dev))):
        x0 = dif.to_model_range(b.images.to(dev).float())
        g = torch.Generator().manual_seed(dif._mix(seed, 3, k))
        eps = torch.randn(x0.shape, generator=g).to(dev)
        tt = dif.timesteps(t, x0.shape[0], dev)
        logits = model(dif.add_noise(x0, eps, tt, profile), tt)
        probs.append(F.softmax(logits.float(), dim=1)[:, 1].cpu())
        labels.append(b.labels.cpu())
    if not probs:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def get_noisy_classifier(ctx: "RunContext") -> NoisyClassifier:
    """The task's noisy classifier, a shared model (trained once per task and seed, cached as
    safetensors, resumable, memoised).

    Returned frozen (``requires_grad=False`` on its parameters; gradients w.r.t. its input
    still flow), in eval, on ``ctx.device``.
    """
    spec, recipe = dict(ctx.profile.cdm_unet), dict(ctx.profile.noisy_classifier)
    size = int(ctx.data.image_size)

    def build():
        return build_noisy_classifier(spec, ctx.task.channels, size, seed=ctx.seed("init/noisy-classifier"))

    def train(model, run):
        return train_noisy_classifier(model, ctx.data, ctx.profile, run.device, run.seed, run.work,
                                      flips=ctx.task.flips, bf16=ctx.bf16, progress=run.advance)

    params = {"encoder": spec, "train": recipe, **rule_params(ctx.profile, ctx.profile.noisy_classifier),
              "mg_t_ref": [int(t) for t in ctx.profile.mg.t_ref], "schedule": [int(ctx.profile.common.diffusion_timesteps),
                                                             str(ctx.profile.common.schedule)],
              "image_size": size, "channels": int(ctx.task.channels)}
    return ctx.shared_model("noisy-classifier", build, train, params=params, source=[sys.modules[__name__]],
                            total=int(recipe["iterations"]))
