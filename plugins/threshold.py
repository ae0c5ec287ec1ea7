"""Threshold: the protocol's map-to-mask rules (docs/protocol.md section 6) as a refiner.

- ``cam``: per-image min-max to [0, 1], then > ``value`` (0.5 in the protocol);
  GradCAM, GradCAM++, ScoreCAM, LayerCAM, SEAM, AME-CAM, DiG.
- ``otsu``: per-image min-max, then Otsu's threshold per image (skimage, 256 bins);
  CDM saliency and MG.
- ``auto`` (default): the rule the CAM source declares in its ``mask_rule``.

A constant map gives an empty mask under both rules.

Several map sources (``--cam gradcam+mg``) fuse as in the paper's Fig. 1(e): the mask is the
intersection of each source's own mask, each by its own rule (``rule=auto``) or all by the
rule given.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, Refiner, SliceBatch
from wsss_bench.maps import OTSU_BINS, binarize_cam, otsu_masks

if TYPE_CHECKING:  # pragma: no cover
    from typing import Sequence

    import torch

RULES = ("auto", "cam", "otsu")
MAP_RULES = ("cam", "otsu")  # the rules a map can be thresholded with


class Threshold(Refiner):
    name = "threshold"
    version = "2"
    params = {"rule": "auto", "value": 0.5}
    description = "protocol threshold: minmax > value (CAMs) or Otsu (diffusion maps)"

    def validate(self) -> None:
        if self.p["rule"] not in RULES:
            raise self.bad_param("rule", f"is not one of {', '.join(RULES)}")
        value = self.p["value"]
        if not (0.0 <= value < 1.0):
            raise self.bad_param("value", "must lie in [0, 1): it thresholds min-max scaled maps")

    def rule_for(self, cam: CamSource | None) -> str:
        """The rule applied to ``cam``'s maps: the parameter, or the source's ``mask_rule``."""
        rule = self.p["rule"]
        if rule != "auto":
            return rule
        if cam is None:
            raise self.bad_param("rule", "is 'auto' but there is no CAM source to take the rule from; set rule=cam or rule=otsu")
        declared = getattr(cam, "mask_rule", None)
        if declared not in MAP_RULES:
            raise self.bad_param(
                "rule",
                f"is 'auto' but CAM source '{getattr(cam, 'name', cam)}' declares mask_rule="
                f"{declared!r}, which is not a threshold rule ({', '.join(MAP_RULES)}); "
                f"set rule=cam or rule=otsu",
            )
        return declared

    def mask(self, maps: "torch.Tensor", cam: CamSource | None) -> "torch.Tensor":
        """One source's (B, S, S) maps -> masks by its rule."""
        rule = self.rule_for(cam)
        if rule == "cam":
            return binarize_cam(maps, self.p["value"])
        return otsu_masks(maps, OTSU_BINS)

    def refine(self, batch: SliceBatch, maps: "Sequence[torch.Tensor]", sources: "Sequence[CamSource]") -> "torch.Tensor":
        if not maps:
            raise self.bad_param("rule", "needs maps from a map source (--cam NAME), got none")
        masks = [self.mask(m, cam) for m, cam in zip(maps, sources)]
        out = masks[0]
        for m in masks[1:]:
            out = out & m  # Fig. 1(e): intersection of each source's own mask
        return out


@hookimpl
def register_refiners(register):
    register(Threshold)
