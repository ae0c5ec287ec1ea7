"""CDM diffusion features (CLDF, docs/methods/diffusion.md): the "CDM" row of Table 2.

Network: the task's shared CDM (docs/methods/diffusion.md), frozen, EMA weights where the profile has EMA.

Hyperparameters:
- timesteps t_ref = {1, 10, 50, 100} on the 4000-step reference scale, matched to harness
  indices {0, 2, 12, 24} [paper; mapping inferred]; ``t_scale=native`` uses them as is;
- blocks: the outputs of ``unet.up_blocks[i]`` chosen by the profile's
  ``cldf.feature_blocks`` (paper: up 1-3, i.e. 32, 64 and 128 px, D = 1024);
- noisy input x_t = add_noise(2x - 1, eps_t, t) with one fixed seeded eps_t (1, C, S, S)
  per t shared by all images, component ``noise/features/t=<t>`` [inferred];
- class label 1 [inferred: only positive or gate-passed slices reach CLDF].

Feature: F = mean_t concat_l Up(a_{l,t}), computed as Up(mean_t a_{l,t}) (exactly equal).
Never materialised densely: the template (:class:`wsss_bench.nn.backbone.ActivationBackbone`)
gathers the native-resolution activations at chosen pixels (grid_sample, bilinear, border,
align_corners=False) and streams one image in pixel chunks, so memory is O(chunk * D) per image.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from wsss_bench.hookspecs import hookimpl
from wsss_bench.nn import diffusion_features as dfeat
from wsss_bench.nn.backbone import ActivationBackbone

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from wsss_bench.context import RunContext

T_SCALES = ("ref4000", "native")
REF_SCHEDULES = ("cosine", "linear")


class CDMFeatures(ActivationBackbone):
    name = "cdm"
    version = "1"
    params = {"t_ref": [1, 10, 50, 100], "t_scale": "ref4000", "ref_schedule": "cosine", "blocks": "profile",
              "label": 1}
    description = "CDM decoder activations, averaged over t, gathered / streamed per pixel (CLDF)"
    contract_fixed_params = ("label",)  # a class label, not a size: only 0 and 1 exist

    def validate(self) -> None:
        if not self.p["t_ref"]:
            raise self.bad_param("t_ref", "needs at least one timestep")
        if self.p["t_scale"] not in T_SCALES:
            raise self.bad_param("t_scale", f"is not one of {', '.join(T_SCALES)}")
        if self.p["ref_schedule"] not in REF_SCHEDULES:
            raise self.bad_param("ref_schedule", f"is not one of {', '.join(REF_SCHEDULES)}")
        if self.p["label"] not in (0, 1):
            raise self.bad_param("label", "must be 0 or 1 (the CDM has two class embeddings)")

    # ------------------------------------------------------------------ what it needs
    def prepare(self, ctx: "RunContext") -> None:
        from wsss_bench.nn.diffusion import get_cdm, harness_timesteps, match_table

        self.ctx = ctx
        self.unet = get_cdm(ctx)
        size = int(ctx.data.image_size)
        spec = ctx.profile.cdm_unet
        rule = ctx.profile.cldf.feature_blocks if self.p["blocks"] == "profile" else self.p["blocks"]
        try:
            self.blocks = dfeat.select_blocks(rule, spec, size)
        except ValueError as err:
            raise self.bad_param("blocks", str(err)) from None
        self.set_geometry(size, dfeat.feature_dim(spec, self.blocks))
        self.ts = harness_timesteps(self.p["t_ref"], self.p["t_scale"], self.p["ref_schedule"], ctx.profile)
        self.noises = [dfeat.feature_noise(ctx, t, size) for t in self.ts]
        ctx.record("match/features", match_table(self.p["t_ref"], self.p["t_scale"], self.p["ref_schedule"],
                                                 ctx.profile))
        ctx.record("features/cdm", {"blocks": self.blocks, "dim": self.dim, "label": int(self.p["label"])})

    # ------------------------------------------------------------------ what it computes
    def activations(self, images: "torch.Tensor") -> list["torch.Tensor"]:
        """a-bar_l = mean_t a_{l,t}, native resolution: [(B, C_l, h_l, w_l)]."""
        return dfeat.mean_activations(self.unet, images.to(self.ctx.device), self.ts, self.noises, self.blocks,
                                      label=int(self.p["label"]), profile=self.ctx.profile,
                                      autocast=self.ctx.autocast)


@hookimpl
def register_backbones(register):
    register(CDMFeatures)
