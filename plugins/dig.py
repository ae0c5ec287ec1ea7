"""DiG (Yoon et al. 2024; yoon307/DiG), adapted: docs/methods/dig.md.

A ViT CAM refined by cross-attention to low-resolution diffusion features, plus consistency
with a denoised copy of the image.  Networks, losses and the training loop are in
:mod:`wsss_bench.nn.dig`; this module wires them to the run.

Diffusion source (``ddpm``):
- ``shared`` (default) [inferred]: the task's frozen CDM (docs/methods/diffusion.md) with class label 1;
- ``separate`` [reference code]: DiG's own unconditional ``DiffusionModelUNet`` (the CDM's
  widths, ``num_class_embeds=None``), trained with the CDM's recipe (profile ``cdm``).

Features at harness t = 0..4 with fresh seeded noise per slice (component
``noise/dig/<case>/<z>``): middle block + every up block, resized to the g x g grid
(``align_corners=True``), the 5 t's stacked on channels; x0-hat from the same network at
harness t = 100.  With the profile's ``dig.feature_cache`` both are computed once for the
training slices into memory-mapped ``.npy`` files (an artifact keyed on the diffusion
network), otherwise every training step recomputes them; the values are the same.

Training (a shared model, resumable): L_cls + L_pred + L_cls_diff, plus L_cons + 10 L_pac
after the warm-up fraction (``common.dig_warmup_fraction`` = 10/60); AdamW lr 5e-4 B/512,
wd 0.05; cosine with a 5/60 warm-up; epochs and batch from the profile.

Map: rcams of x plus the flipped-back rcams of its flip (BraTS), ReLU -> Up -> minmax.
Mask: minmax > 0.5 (``mask_rule = "cam"``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wsss_bench.errors import PluginError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, SliceBatch
from wsss_bench.lazy import torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

    Tensor = _torch.Tensor

DDPM_MODES = ("shared", "separate")


class DiGSource(CamSource):
    name = "dig"
    version = "1"
    params = {"ddpm": "shared"}
    mask_rule = "cam"
    no_grad = True
    description = "DiG (Yoon 2024): ViT CAM refined by cross-attention to CDM features, denoised-image consistency"

    def validate(self) -> None:
        if self.p["ddpm"] not in DDPM_MODES:
            raise self.bad_param("ddpm", f"is not one of {', '.join(DDPM_MODES)} "
                                         "(shared = the task's CDM, separate = DiG's own unconditional DDPM)")

    # ------------------------------------------------------------------ the diffusion network
    def diffusion_network(self, ctx: "RunContext"):
        """(frozen network, class label or None, its artifact key)."""
        from wsss_bench.nn import diffusion as dif

        if self.p["ddpm"] == "shared":
            unet = dif.get_cdm(ctx)
            return unet, 1, ctx.shared_model_key("cdm")
        spec, recipe = dict(ctx.profile.cdm_unet), dict(ctx.profile.cdm)
        c = int(ctx.task.channels)

        def build():
            from monai.networks.nets import DiffusionModelUNet

            kwargs = {**dif.unet_kwargs(spec, c), "num_class_embeds": None}  # unconditional
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed("init/dig-ddpm") % (2**63))
                return DiffusionModelUNet(**kwargs)

        def train(model, run):
            # the CDM's recipe; an unconditional UNet ignores the class labels train_cdm passes
            return dif.train_cdm(model, ctx.data, ctx.profile, run.device, run.seed, run.work,
                                 flips=ctx.task.flips, bf16=ctx.bf16, progress=run.advance)

        params = {"unet": spec, "conditioning": None, "train": recipe,
                  "schedule": [int(ctx.profile.common.diffusion_timesteps), str(ctx.profile.common.schedule)],
                  "image_size": int(ctx.data.image_size), "channels": c}
        unet = ctx.shared_model("dig-ddpm", build, train, params=params, source=[dif],
                                total=int(recipe["iterations"]))
        return unet, None, ctx.shared_model_key("dig-ddpm")

    # ------------------------------------------------------------------ prepare
    def prepare(self, ctx: "RunContext") -> None:
        from wsss_bench.nn import dig as D
        from wsss_bench.nn import training as tr

        self.ctx = ctx
        spec = dict(ctx.profile.dig)
        size, c = int(ctx.data.image_size), int(ctx.task.channels)
        grid = int(spec["grid"])
        if size % grid or size // grid != int(spec["patch"]):
            raise PluginError(f"cams plugin 'dig': profile dig.patch={spec['patch']} x dig.grid={grid} "
                              f"!= image_size {size}; fix the profile's dig section")
        unet, label, unet_key = self.diffusion_network(ctx)
        feat_in = len(D.FEATURE_T) * D.feature_dim(ctx.profile.cdm_unet)
        idx = ctx.data.split("train")
        generator = ctx.generator

        def noise_for(batch: SliceBatch) -> "Tensor":
            return D.slice_noise(generator, batch.case_ids, batch.z, c, size)

        autocast = ctx.autocast if ctx.bf16 else None
        inputs = D.DiffusionInputs(unet, grid, label, noise_for, ctx.profile, autocast)
        upstream = [unet_key]
        feature_params = {"ddpm": self.p["ddpm"], "label": label, "feature_t": list(D.FEATURE_T),
                          "denoise_t": D.DENOISE_T, "grid": grid, "feat_in": feat_in, "image_size": size,
                          "rows": int(len(idx))}
        if bool(spec["feature_cache"]):
            batch = int(spec["batch"])

            def build_cache(work: Path) -> dict:
                with ctx.stage("dig/feature-cache"), ctx.progress("DiG feature cache", len(idx)) as advance:
                    return D.build_feature_cache(work, inputs, ctx.data.batches(idx, batch, device=ctx.device), idx,
                                                 feat_in, c, size, progress=advance)

            built = ctx.artifact("dig-features", self, build_cache, params=feature_params, upstream=upstream,
                                 source=[D])
            inputs = D.DiffusionInputs(unet, grid, label, noise_for, ctx.profile, autocast, cache=built.path)
            upstream.append(built.key)

        def build():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed("init/dig") % (2**63))
                return D.DiG(c, size, spec, feat_in)

        def train(model, run):
            return D.train_dig(model, ctx.data, idx, inputs, spec, run.device, run.seed, run.work,
                               flips=ctx.task.flips, warmup_fraction=float(ctx.profile.common.dig_warmup_fraction),
                               bf16=ctx.bf16, progress=run.advance,
                               rule=tr.rule_from_profile(ctx.profile, spec, "score", per_epoch))

        per_epoch = max(1, len(idx) // int(spec["batch"]))
        iterations = int(spec["epochs"]) * per_epoch
        params = {"dig": spec, "diffusion": feature_params, "warmup_fraction": float(ctx.profile.common.dig_warmup_fraction),
                  "recipe": {"lr": D.dig_lr(int(spec["batch"])), "weight_decay": D.WEIGHT_DECAY,
                             "lr_warmup_fraction": D.LR_WARMUP_FRACTION, "kd_alpha": D.KD_ALPHA, "kd_t": D.KD_T,
                             "pac_weight": D.PAC_WEIGHT, "drop_path": D.DROP_PATH, "topk": D.TOPK},
                  "flips": bool(ctx.task.flips), "channels": c, **tr.rule_params(ctx.profile, spec)}
        model = ctx.shared_model("dig", build, train, params=params, source=[D, sys.modules[__name__]],
                                 upstream=upstream, total=iterations)
        self.vit = model.vit
        ctx.record("dig", {"ddpm": self.p["ddpm"], "label": label, "feature_t": list(D.FEATURE_T),
                           "denoise_t": D.DENOISE_T, "feat_in": feat_in, "grid": grid, "iterations": iterations,
                           "loss_warmup_iterations": D.warmup_iterations(iterations, ctx.profile.common.dig_warmup_fraction),
                           "feature_cache": bool(spec["feature_cache"]), "flip_tta": bool(ctx.task.flips)})

    # ------------------------------------------------------------------ maps
    def maps(self, batch: SliceBatch) -> "Tensor":
        from wsss_bench.nn.dig import rcam_maps

        images = batch.images.to(self.ctx.device).float()
        with self.ctx.autocast():
            return rcam_maps(self.vit, images, bool(self.ctx.task.flips), images.shape[-1])  # (B, S, S)


@hookimpl
def register_cam_sources(register):
    register(DiGSource)
