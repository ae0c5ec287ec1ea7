"""SEAM (Wang et al. 2020; YudeWang/SEAM), docs/methods/seam.md: the ``seam`` CAM source.

Network: the SEAM network of :mod:`wsss_bench.nn.seam`, the profile's CAM-classifier
architecture (``cam_classifier``: arch and widths) at output stride 8 with a 2-channel CAM
head (0 background, 1 foreground) and the pixel correlation module (PCM).  It is its own
shared model (``seam``), trained once per task and seed on the non-ambiguous training
slices with L = L_cls + L_ER + L_ECR on the image and its rescaled (``seam.view_scale``)
view, flipped on BraTS; resumable; cached as safetensors.

Map, per image (docs/methods/seam.md, inference):

    m = minmax( ReLU( sum over s in seam.tta_scales, flip in {no, yes} (BraTS only)
                      of Up_SxS(cam_rv(x_s)[fg]), flipped back ) )

Mask: minmax(m) > 0.5 (docs/protocol.md section 6, ``mask_rule = "cam"``).

Parameter ``bg`` [reference code option]: ``none`` (default, the protocol's 0.5 threshold)
or a background score in (0, 1) such as 0.26, the reference's ``out_cam_pred_alpha``: the
reference labels a pixel foreground when its normalised map beats a constant background
score.  The map is then remapped monotonically (bg -> 0.5, 0 and 1 fixed) so that the
protocol's rule keeps exactly the pixels with m > bg.

A profile whose second view (``seam.view_scale``) or a TTA scale (``seam.tta_scales``)
would give a CAM grid below 2 x 2 is refused with an error naming that value before
anything trains.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, SliceBatch
from wsss_bench.lazy import torch

if TYPE_CHECKING:  # pragma: no cover
    from wsss_bench.context import RunContext


class Seam(CamSource):
    name = "seam"
    version = "1"
    params = {"bg": "none"}
    mask_rule = "cam"
    no_grad = True
    description = "SEAM: PCM-refined CAM of a Siamese network trained with equivariance losses (ER, ECR)"

    def validate(self) -> None:
        self.bg = self._parse_bg()

    def _parse_bg(self) -> float | None:
        text = str(self.p["bg"]).strip().lower()
        if text == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            raise self.bad_param("bg", "must be 'none' or a background score in (0, 1), e.g. bg=0.26") from None
        if not 0.0 < value < 1.0:
            raise self.bad_param("bg", "must lie strictly between 0 and 1 (the reference uses 0.26), or be 'none'")
        return value

    def prepare(self, ctx: "RunContext") -> None:
        import sys

        from wsss_bench.nn import seam as sm
        from wsss_bench.nn.training import rule_params

        self.ctx = ctx
        cfg = ctx.profile.seam
        channels, size = int(ctx.task.channels), int(ctx.data.image_size)
        spec = sm.seam_backbone_spec(ctx.profile.cam_classifier)
        self.tta_scales = [float(s) for s in cfg.tta_scales]
        owner = f"{self.kind} plugin '{self.name}' (profile '{ctx.profile.name}')"
        geometry: dict = {}

        def build():
            model = sm.build_seam(spec, channels, seed=ctx.seed("init/seam"))
            # before anything trains: a collapsed view is the profile's fault, say which value
            geometry.update(sm.check_geometry(model, channels, size, float(cfg.view_scale), self.tta_scales,
                                              owner=owner))
            return model

        def train(model, run):
            return sm.train_seam(model, ctx.data, ctx.profile, run.device, run.seed, run.work, flips=ctx.task.flips,
                                 bf16=ctx.bf16, progress=run.advance)

        params = {"backbone": spec, "in_chans": channels, "image_size": size, "epochs": int(cfg.epochs),
                  "batch": int(cfg.batch), "view_scale": float(cfg.view_scale), "flips": bool(ctx.task.flips),
                  "recipe": dict(sm.RECIPE), "bf16": bool(ctx.bf16), **rule_params(ctx.profile, cfg)}
        n_train = len(ctx.data.split("train"))
        self.model = ctx.shared_model("seam", build, train, params=params, source=[sys.modules[sm.__name__]],
                                      total=sm.seam_iterations(n_train, cfg))
        ctx.record("seam", {"tta_scales": self.tta_scales, "tta_flip": bool(ctx.task.flips),
                            "view_scale": float(cfg.view_scale), "view_flip": bool(ctx.task.flips),
                            "bg": self.bg, "geometry": geometry,
                            "map": "minmax(ReLU(sum of Up'd cam_rv fg over TTA))"})

    def maps(self, batch: SliceBatch) -> "torch.Tensor":
        from wsss_bench.nn import seam as sm

        images = batch.images.to(self.ctx.device).float()
        m = sm.seam_maps(self.model, images, self.tta_scales, flips=self.ctx.task.flips, autocast=self.ctx.autocast)
        if self.bg is not None:
            m = sm.background_remap(m, self.bg)
        return m  # (B, S, S) in [0, 1]


@hookimpl
def register_cam_sources(register):
    register(Seam)
