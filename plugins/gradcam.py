"""GradCAM (Selvaraju et al. 2017), docs/methods/gradcam.md.

Network: the shared CAM classifier (docs/methods/conventions.md), trained once per task and seed and
reused by GradCAM++, ScoreCAM and LayerCAM.

Target: the output A (K x h x w) of ``layer`` (default ``layer4``, the last stage) and the
score y = logit[1], the raw logit of the positive class, for every image (also negative
slices).

Map, per image:

    g   = dy/dA
    a_k = mean_ij g_k,ij                      (channel weights)
    cam = ReLU(sum_k a_k A_k) -> Up to S x S -> minmax

Mask: minmax(cam) > 0.5 (docs/protocol.md section 6, ``mask_rule = "cam"``).

Paper and reference code agree on every step.  One backward of sum_b y_b serves a batch;
gradients are captured with tensor hooks (timm ResNets use in-place ReLU) and the layers
below the target layer run without an autograd graph (see wsss_bench.nn.cam).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from wsss_bench.hookspecs import hookimpl
from wsss_bench.lazy import F
from wsss_bench.nn.cam import CamExtractor, ClassifierCam

if TYPE_CHECKING:  # pragma: no cover
    import torch


class GradCAMExtractor(CamExtractor):
    """GradCAM's layer map: ReLU of the activations weighted by their mean gradient."""

    def layer_map(self, acts: "torch.Tensor", grads: "torch.Tensor") -> "torch.Tensor":
        alpha = grads.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
        return F.relu((alpha * acts).sum(dim=1))  # (B, h, w)


class GradCAM(ClassifierCam):
    """Classifier, layer check, extractor and maps come from ClassifierCam."""

    name = "gradcam"
    version = "1"
    params = {"layer": "layer4"}
    description = "GradCAM on the shared CAM classifier (mean-gradient channel weights)"
    extractor_class = GradCAMExtractor


@hookimpl
def register_cam_sources(register):
    register(GradCAM)
