"""LayerCAM (Jiang et al. 2021), docs/methods/layercam.md.

Network: the shared CAM classifier (docs/methods/conventions.md).  Score y = logit[1], the raw logit
of the positive class, for every image.

Single layer l [paper / official PengtaoJiang/LayerCAM], pixel-wise weights:

    g     = dy/dA_l
    cam_l = ReLU(sum_k ReLU(g_k) * A_k)

With one layer the map is minmax(Up(cam_l)) under every fusion.  With several layers:

``fusion=paper`` (Table 1 default, and CLDF's CAM source for FLARE).  The paper scales the
maps of the *shallow* layers, whose values are small next to the deep layer's, and fuses
by an element-wise maximum:

    m_l   = tanh(2 * minmax(cam_l))        shallow layers (Eq. 9, gamma = 2)
    m_L   = minmax(cam_L)                  the deepest layer, unscaled
    fused = max_l Up(m_l) -> minmax        (element-wise max at S x S)

The deepest layer is the target layer that runs last in the forward pass (whatever the
order of ``layers``).

``fusion=torchcam`` (frgfm/torch-cam 0.5.0, and this plugin's ``paper`` before version 2):
every layer scaled, the deepest included, m_l = tanh(2 * minmax(cam_l)), then the same
max and minmax.

``fusion=library`` (pytorch-grad-cam 1.5.7): per layer (cam_l - min) / (max - min + 1e-7)
at the layer's resolution, Up, the mean over layers, min-max scaled again.

Layers (``layers``, default ``layer2+layer3+layer4``, docs/methods/layercam.md [inferred]).  A
layer whose resolution is later reduced by a strided convolution receives gridded
gradients (the stride's transpose scatters them onto every other pixel; the skip
connections carry them back through the whole stage), which is why the official code hooks
VGG16 *after* its pooling layers.  In the smoke and cpu profiles the classifier is a
ResNet18 with output stride 8: layer2, layer3 and layer4 all run at S/8 (layer3 and layer4
are dilated, not strided), so none of them is followed by a stride; layer1 is, and is
left out.  With output stride 32 (the paper profile's ResNet50) layer2 and layer3 are
followed by strides: the plugin warns and records it in the manifest
(``layercam/strided_layers``); give ``layers=layer4`` or inner layer4 blocks there if the
grid shows.

Mask: minmax(map) > 0.5 (docs/protocol.md section 6).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

from wsss_bench.errors import PluginError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.lazy import F, torch
from wsss_bench.maps import minmax, upsample
from wsss_bench.nn.cam import CamExtractor, ClassifierCam, library_fusion, resolve_layers

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

FUSIONS = ("paper", "torchcam", "library")
#: docs/methods/layercam.md: the layers fused by default
DEFAULT_LAYERS = ["layer2", "layer3", "layer4"]
#: Eq. 9 of the paper: m_l = tanh(GAMMA * minmax(cam_l))
GAMMA = 2.0


def paper_fusion(maps: Sequence["_torch.Tensor"], size: tuple[int, int], deepest: int = -1) -> "_torch.Tensor":
    """max_l Up(m_l), before the final min-max; (B, S, S).

    m_l = tanh(2 minmax(cam_l)) for the shallow layers and minmax(cam_l) for
    ``maps[deepest]`` (paper Eq. 9 scales the shallow layers only).
    """
    deepest = deepest % len(maps)
    fused = None
    for l, cam in enumerate(maps):
        m = minmax(cam) if l == deepest else torch.tanh(GAMMA * minmax(cam))
        m = upsample(m, size)
        fused = m if fused is None else torch.maximum(fused, m)
    return fused


def torchcam_fusion(maps: Sequence["_torch.Tensor"], size: tuple[int, int]) -> "_torch.Tensor":
    """max_l Up(tanh(2 minmax(cam_l))) over every layer (torch-cam 0.5.0), before the final min-max."""
    fused = None
    for cam in maps:
        m = upsample(torch.tanh(GAMMA * minmax(cam)), size)
        fused = m if fused is None else torch.maximum(fused, m)
    return fused


class LayerCAMExtractor(CamExtractor):
    """LayerCAM's layer map (positive gradients as pixel-wise weights) and its fusions."""

    def __init__(self, model: "_torch.nn.Module", layers: "str | Sequence[str]", fusion: str = "paper",
                 target_class: int = 1, owner: str = "") -> None:
        super().__init__(model, layers, target_class=target_class, owner=owner)
        if fusion not in FUSIONS:
            raise PluginError(f"{owner + ': ' if owner else ''}unknown LayerCAM fusion {fusion!r}; "
                              f"use one of {', '.join(FUSIONS)}")
        self.fusion = fusion

    def layer_map(self, acts: "_torch.Tensor", grads: "_torch.Tensor") -> "_torch.Tensor":
        return F.relu((F.relu(grads) * acts).sum(dim=1))  # (B, h, w)

    def fuse(self, maps: list["_torch.Tensor"], size: tuple[int, int]) -> "_torch.Tensor":
        if len(maps) == 1:
            return minmax(upsample(maps[0], size))
        if self.fusion == "paper":
            # the deepest layer is the one that ran last; before any forward, the last given
            deepest = self.forward_order[-1] if len(self.forward_order) == len(maps) else len(maps) - 1
            return minmax(paper_fusion(maps, size, deepest))
        if self.fusion == "torchcam":
            return minmax(torchcam_fusion(maps, size))
        return library_fusion(maps, size)


def strided_layers(model: "_torch.nn.Module", names: Sequence[str], example: "_torch.Tensor") -> list[str]:
    """The layers among ``names`` whose output resolution is later reduced by a stride.

    One forward of ``example`` records each target layer's output size and the input size
    of every convolution or pooling with a stride > 1 that runs after it.  A layer counts
    as strided when such an op later consumes a map of its resolution (in a ResNet, the
    first block of the next stage), which is when its gradient comes back gridded.
    """
    layers = resolve_layers(model, names)
    seen: dict[int, tuple[int, int]] = {}
    strided: set[int] = set()
    handles = []

    def after_target(i):
        def hook(module, inputs, output):
            if torch.is_tensor(output):
                seen[i] = tuple(output.shape[-2:])
        return hook

    def before_strided(module, inputs):
        if not inputs or not torch.is_tensor(inputs[0]):
            return
        hw = tuple(inputs[0].shape[-2:])
        for i, res in seen.items():
            if res == hw:
                strided.add(i)

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(after_target(i)))
    for module in model.modules():
        stride = getattr(module, "stride", 1)
        stride = stride if isinstance(stride, (tuple, list)) else (stride,)
        if isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d)) and \
                any(int(s) > 1 for s in stride):
            handles.append(module.register_forward_pre_hook(before_strided))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return [names[i] for i in sorted(strided)]


class LayerCAM(ClassifierCam):
    """Classifier, layer check, extractor and maps come from ClassifierCam; LayerCAM adds
    its fusion and the strided-layer check."""

    name = "layercam"
    version = "2"  # 2: fusion=paper scales the shallow layers only (was torchcam's fusion)
    params = {"layers": list(DEFAULT_LAYERS), "fusion": "paper"}
    description = "LayerCAM on the shared CAM classifier (pixel-wise positive-gradient weights, multi-layer fusion)"
    extractor_class = LayerCAMExtractor
    layer_param = "layers"

    def validate(self) -> None:
        if self.p["fusion"] not in FUSIONS:
            raise self.bad_param("fusion", f"is not one of {', '.join(FUSIONS)}")
        super().validate()

    def extractor_options(self, ctx: "RunContext") -> dict:
        return {"fusion": self.p["fusion"]}

    def prepare(self, ctx: "RunContext") -> None:
        super().prepare(ctx)
        size = int(getattr(getattr(ctx, "profile", None), "image_size", 0) or 0)
        channels = getattr(getattr(ctx, "task", None), "channels", None)
        if len(self.layers) > 1 and size and channels:
            example = torch.zeros(1, int(channels), size, size, device=ctx.device)
            gridded = strided_layers(self.model, self.layers, example)
            if hasattr(ctx, "record"):
                ctx.record("layercam/strided_layers", gridded)
            if gridded:
                warnings.warn(
                    f"layercam: {', '.join(gridded)} feed(s) a strided convolution or pooling, so "
                    f"their gradients are gridded (docs/methods/layercam.md); consider layers without a "
                    f"later stride, e.g. layers=layer4", stacklevel=2)


@hookimpl
def register_cam_sources(register):
    register(LayerCAM)
