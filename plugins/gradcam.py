"""GradCAM (Selvaraju et al. 2017), METHODS section 2.

Network: the shared CAM classifier (METHODS section 0), trained once per task and seed and
reused by GradCAM++, ScoreCAM and LayerCAM.

Target: the output A (K x h x w) of ``layer`` (default ``layer4``, the last stage) and the
score y = logit[1], the raw logit of the positive class, for every image (also negative
slices).

Map, per image:

    g   = dy/dA
    a_k = mean_ij g_k,ij                      (channel weights)
    cam = ReLU(sum_k a_k A_k) -> Up to S x S -> minmax

Mask: minmax(cam) > 0.5 (PROTOCOL section 6, ``mask_rule = "cam"``).

Paper and reference code agree on every step.  One backward of sum_b y_b serves a batch;
gradients are captured with tensor hooks (timm ResNets use in-place ReLU) and the layers
below the target layer run without an autograd graph (see wsss_bench.nn.cam).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, SliceBatch
from wsss_bench.lazy import F
from wsss_bench.nn.cam import CamExtractor

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from wsss_bench.context import RunContext


class GradCAMExtractor(CamExtractor):
    """GradCAM's layer map: ReLU of the activations weighted by their mean gradient."""

    def layer_map(self, acts: "torch.Tensor", grads: "torch.Tensor") -> "torch.Tensor":
        alpha = grads.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
        return F.relu((alpha * acts).sum(dim=1))  # (B, h, w)


class GradCAM(CamSource):
    name = "gradcam"
    version = "1"
    params = {"layer": "layer4"}
    mask_rule = "cam"
    description = "GradCAM on the shared CAM classifier (mean-gradient channel weights)"

    def validate(self) -> None:
        if not isinstance(self.p["layer"], str) or not self.p["layer"].strip():
            raise self.bad_param("layer", "must name a module of the classifier, e.g. layer4")

    def prepare(self, ctx: "RunContext") -> None:
        self.model = ctx.classifier()  # trained, eval mode, on ctx.device
        self.extractor = GradCAMExtractor(
            self.model, self.p["layer"], owner=f"cam plugin '{self.name}' (parameter layer)"
        )

    def maps(self, batch: SliceBatch) -> "torch.Tensor":
        images = batch.images
        return self.extractor(images, size=tuple(images.shape[-2:]))


@hookimpl
def register_cam_sources(register):
    register(GradCAM)
