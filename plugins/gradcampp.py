"""GradCAM++ (Chattopadhay et al. 2018), docs/methods/gradcampp.md.

Network: the shared CAM classifier (docs/methods/conventions.md), the one GradCAM, ScoreCAM and
LayerCAM use.

Target: the output A (K x h x w) of ``layer`` (default ``layer4``) and y = logit[1], the raw
logit of the positive class, for every image.

Map, per image (the closed form of pytorch-grad-cam, docs/methods/gradcampp.md):

    g     = dy/dA
    a     = g^2 / (2 g^2 + (sum_ab A_k,ab) g^3 + 1e-6),   a = 0 where g = 0
    w_k   = sum_ij a_k,ij ReLU(g_k,ij)                    (channel weights)
    cam   = ReLU(sum_k w_k A_k) -> Up to S x S -> minmax

The paper's derivation through exp(score) only rescales every w_k by one positive factor,
which min-max removes.  Mask: minmax(cam) > 0.5 (docs/protocol.md section 6).

Only the per-layer map differs from GradCAM; capture, the one backward per batch and the
graph-free layers below the target come from wsss_bench.nn.cam.CamExtractor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from wsss_bench.hookspecs import hookimpl
from wsss_bench.lazy import F, torch
from wsss_bench.nn.cam import CamExtractor, ClassifierCam

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

#: the epsilon in the denominator of a (pytorch-grad-cam's value)
EPS = 1e-6


def gradcampp_weights(acts: "_torch.Tensor", grads: "_torch.Tensor") -> "_torch.Tensor":
    """Channel weights w (B, K) from activations and gradients (B, K, h, w)."""
    g2 = grads * grads
    g3 = g2 * grads
    sum_a = acts.sum(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    alpha = g2 / (2 * g2 + sum_a * g3 + EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (alpha * F.relu(grads)).sum(dim=(2, 3))  # (B, K)


class GradCAMPPExtractor(CamExtractor):
    """GradCAM++'s layer map: activations weighted by the second-order weights w_k."""

    def layer_map(self, acts: "_torch.Tensor", grads: "_torch.Tensor") -> "_torch.Tensor":
        w = gradcampp_weights(acts, grads)  # (B, K)
        return F.relu((w[:, :, None, None] * acts).sum(dim=1))  # (B, h, w)


class GradCAMPP(ClassifierCam):
    """Classifier, layer check, extractor and maps come from ClassifierCam."""

    name = "gradcampp"
    version = "1"
    params = {"layer": "layer4"}
    description = "GradCAM++ on the shared CAM classifier (second-order channel weights)"
    extractor_class = GradCAMPPExtractor


@hookimpl
def register_cam_sources(register):
    register(GradCAMPP)
