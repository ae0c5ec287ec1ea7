"""Noisy-classifier encoder features (docs/methods/backbones.md): the "UNet encoder" row of Table 2.

Network: the task's noisy classifier (docs/methods/diffusion.md), "the same backbone as the CDM encoder,
without conditioning", frozen, in eval.

Features [paper: the source; inferred: blocks and t-averaging]: every down block's output of
``features(x_t, t)`` for x_t = add_noise(2x - 1, eps_t, t), at the CDM backbone's four
feature timesteps (t_ref {1, 10, 50, 100} on the 4000-step reference scale -> harness
{0, 2, 12, 24}) with the *same* fixed seeded noise eps_t (1, C, S, S) per t as the ``cdm``
backbone (component ``noise/features/t=<t>``), averaged over t at native resolution, Up
(bilinear, align_corners=False) to S x S and concatenated: D = sum of the encoder widths
(paper: 128+128+256+256+512+512 = 1792).  As in section 10, Up is linear and the same for
every t, so the mean over t is taken before the (virtual) upsampling: exactly equal.

Never materialised densely: the template (:class:`wsss_bench.nn.backbone.ActivationBackbone`)
gathers the native-resolution block outputs at chosen pixels (grid_sample, equal to Up +
index) and streams one image in pixel chunks.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Sequence

from wsss_bench.hookspecs import hookimpl
from wsss_bench.lazy import torch
from wsss_bench.nn import diffusion_features as dfeat
from wsss_bench.nn.backbone import ActivationBackbone

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

    Tensor = _torch.Tensor

T_SCALES = ("ref4000", "native")
REF_SCHEDULES = ("cosine", "linear")


def encoder_mean_features(model, images: "Tensor", ts: Sequence[int], noises: Sequence["Tensor"], profile=None,
                          autocast=None) -> list["Tensor"]:
    """mean_t of every down block's output of ``model.features(x_t, t)``: [(B, c_l, h_l, w_l)] float32."""
    from wsss_bench.nn.diffusion import add_noise, timesteps, to_model_range

    x0 = to_model_range(images.float())
    b, dev = x0.shape[0], x0.device
    acc: list["Tensor"] | None = None
    with torch.no_grad():
        for t, eps in zip(ts, noises):
            tt = timesteps(t, b, dev)
            xt = add_noise(x0, eps.to(dev).expand_as(x0), tt, profile)
            with (autocast() if autocast is not None else nullcontext()):
                feats = model.features(xt, tt)
            feats = [f.float() for f in feats]
            acc = feats if acc is None else [a.add_(f) for a, f in zip(acc, feats)]
    assert acc is not None, "encoder_mean_features needs at least one timestep"
    return [a.div_(len(ts)) for a in acc]


class UNetEncoderFeatures(ActivationBackbone):
    name = "unet-encoder"
    version = "1"
    params = {"t_ref": [1, 10, 50, 100], "t_scale": "ref4000", "ref_schedule": "cosine"}
    description = "noisy classifier's down-block outputs, averaged over the feature t's (Table 2 'UNet encoder')"

    def validate(self) -> None:
        if not self.p["t_ref"]:
            raise self.bad_param("t_ref", "needs at least one timestep")
        if self.p["t_scale"] not in T_SCALES:
            raise self.bad_param("t_scale", f"is not one of {', '.join(T_SCALES)}")
        if self.p["ref_schedule"] not in REF_SCHEDULES:
            raise self.bad_param("ref_schedule", f"is not one of {', '.join(REF_SCHEDULES)}")

    def prepare(self, ctx: "RunContext") -> None:
        from wsss_bench.nn.diffusion import harness_timesteps, match_table
        from wsss_bench.nn.noisy_classifier import feature_dim, get_noisy_classifier

        self.ctx = ctx
        self.model = get_noisy_classifier(ctx)
        size = int(ctx.data.image_size)
        try:
            self.ts = harness_timesteps(self.p["t_ref"], self.p["t_scale"], self.p["ref_schedule"], ctx.profile)
        except ValueError as err:
            raise self.bad_param("t_ref", str(err)) from None
        self.noises = [dfeat.feature_noise(ctx, t, size) for t in self.ts]  # the cdm backbone's noise
        self.set_geometry(size, feature_dim(ctx.profile.cdm_unet))
        ctx.record("match/features", match_table(self.p["t_ref"], self.p["t_scale"], self.p["ref_schedule"],
                                                 ctx.profile))
        ctx.record("features/unet-encoder", {"blocks": "all down blocks", "dim": self.dim,
                                             "widths": [int(c) for c in ctx.profile.cdm_unet.channels]})

    def activations(self, images: "Tensor") -> list["Tensor"]:
        """mean_t of the down-block outputs at native resolution: [(B, c_l, h_l, w_l)]."""
        return encoder_mean_features(self.model, images.to(self.ctx.device), self.ts, self.noises, self.ctx.profile,
                                     self.ctx.autocast)


@hookimpl
def register_backbones(register):
    register(UNetEncoderFeatures)
