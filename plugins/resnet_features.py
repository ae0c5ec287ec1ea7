"""ResNet features (docs/methods/backbones.md): the "ResNet18" and "ResNet50" rows of Table 2.

Zeng et al. replace the diffusion features F of CLDF by the features of an ImageNet-style
classifier trained with image-level labels only.  Here:

- **network**: a timm ResNet trained with the CAM classifier's recipe (docs/methods/conventions.md:
  CE, Adam 1e-4, wd 1e-5, cosine to 5e-6, epochs / batch from ``profile.classifier``, best
  validation AUC).  The profile holds two such networks, ``cam_classifier`` and
  ``table2_resnet``; backbone ``resnet18`` uses whichever of the two has arch resnet18 and
  ``resnet50`` the other.  Paper profile: the CAM classifier is the ResNet50 and the extra
  network is a full-width ResNet18 (output stride 32); cpu / smoke profiles: the CAM
  classifier is a narrow ResNet18 and the extra one a narrow ResNet50 (output stride 8).
  The CAM classifier is ``get_classifier(ctx)``; the other one is the shared model
  ``table2-resnet``;
- **features**: the outputs of ``layer1`` .. ``layer4`` of one clean forward pass (no noise,
  no flips; eval mode) [inferred: the stages], Up (bilinear, align_corners=False) to S x S
  and concatenated: D = sum of the stage widths (paper: ResNet18 64+128+256+512 = 960,
  ResNet50 256+512+1024+2048 = 3840).

Never materialised densely: the template (:class:`wsss_bench.nn.backbone.ActivationBackbone`)
gathers the native-resolution stage outputs at the chosen pixels with ``grid_sample`` (equal
to Up followed by indexing) and streams one image in pixel chunks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from wsss_bench.errors import PluginError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.lazy import torch
from wsss_bench.nn.backbone import ActivationBackbone
from wsss_bench.nn.classifier import get_classifier

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

    Tensor = _torch.Tensor

STAGES = ["layer1", "layer2", "layer3", "layer4"]
#: the shared-model name of the profile's ``table2_resnet``
TABLE2_MODEL = "table2-resnet"


def get_table2_resnet(ctx: "RunContext"):
    """The profile's ``table2_resnet``, trained with the CAM classifier's recipe (a shared model)."""
    from wsss_bench.nn import classifier as clf

    spec, recipe = dict(ctx.profile.table2_resnet), dict(ctx.profile.classifier)

    def build():
        return clf.build_classifier(ctx.profile.table2_resnet, ctx.task.channels, seed=ctx.seed(f"init/{TABLE2_MODEL}"))

    def train(model, run):
        return clf.train_classifier(model, ctx.data, ctx.profile, run.device, run.seed, flips=ctx.task.flips,
                                    bf16=ctx.bf16, progress=run.advance, work=run.work)

    from wsss_bench.nn.training import rule_params

    n_train = len(ctx.data.split("train"))
    params = {**spec, **recipe, **rule_params(ctx.profile, ctx.profile.classifier)}
    return ctx.shared_model(TABLE2_MODEL, build, train, params=params, source=[clf],
                            total=clf.classifier_steps(n_train, ctx.profile))


def stage_widths(model, stages) -> list[int]:
    """Output channels of the named stages of a timm ResNet (``feature_info``)."""
    info = {f["module"]: int(f["num_chs"]) for f in model.feature_info}
    return [info[s] for s in stages]


def network_for(profile, arch: str) -> str | None:
    """Which profile network is the ``arch`` row: ``cam_classifier``, ``table2_resnet`` or None."""
    if str(profile.cam_classifier.arch) == arch:
        return "cam_classifier"
    if str(profile.table2_resnet.arch) == arch:
        return "table2_resnet"
    return None


class _Stop(Exception):
    """Raised by the hook of the deepest needed stage: the head is never computed."""


def stage_outputs(model, images: "Tensor", stages, autocast=None) -> list["Tensor"]:
    """Outputs (B, C_l, h_l, w_l) float32 of the named stages, one forward, no autograd."""
    from contextlib import nullcontext

    modules = dict(model.named_modules())
    found: dict[str, Any] = {}
    last = [n for n, _ in model.named_modules() if n in stages][-1]  # the deepest one runs last

    def hook_for(name):
        def hook(_m, _i, out):
            found[name] = out
            if name == last:
                raise _Stop

        return hook

    handles = [modules[s].register_forward_hook(hook_for(s)) for s in stages]
    try:
        with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
            try:
                model(images)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return [found[s].float() for s in stages]


class ResNetFeatures(ActivationBackbone):
    """Base of the two ResNet rows; subclasses set ``name`` and ``arch``."""

    arch: ClassVar[str] = ""
    version = "1"
    params = {"stages": list(STAGES)}

    def validate(self) -> None:
        bad = [s for s in self.p["stages"] if s not in STAGES]
        if not self.p["stages"] or bad:
            raise self.bad_param("stages", f"must be a non-empty subset of {'+'.join(STAGES)} joined by '+'")

    def prepare(self, ctx: "RunContext") -> None:
        self.ctx = ctx
        self.stages = [s for s in STAGES if s in self.p["stages"]]
        cam_arch, t2_arch = str(ctx.profile.cam_classifier.arch), str(ctx.profile.table2_resnet.arch)
        which = network_for(ctx.profile, self.arch)
        if which == "cam_classifier":
            self.model = get_classifier(ctx)
        elif which == "table2_resnet":
            self.model = get_table2_resnet(ctx)
        else:
            raise PluginError(f"backbone plugin '{self.name}' needs a {self.arch} classifier, but profile "
                              f"'{ctx.profile.name}' has cam_classifier={cam_arch} and table2_resnet={t2_arch}; "
                              f"set one of them to {self.arch} in the profile or use another backbone")
        self.model.eval()
        self.set_geometry(int(ctx.data.image_size), int(sum(stage_widths(self.model, self.stages))))
        ctx.record(f"features/{self.name}", {"network": which, "arch": self.arch, "stages": self.stages,
                                              "widths": stage_widths(self.model, self.stages), "dim": self.dim})

    def activations(self, images: "Tensor") -> list["Tensor"]:
        """Stage outputs at native resolution: [(B, C_l, h_l, w_l)]."""
        dev = self.ctx.device
        return stage_outputs(self.model, images.to(dev).float(), self.stages, self.ctx.autocast)


class ResNet18Features(ResNetFeatures):
    name = "resnet18"
    arch = "resnet18"
    description = "layer1..4 of the resnet18 classifier trained on image labels (Table 2), gathered / streamed"


class ResNet50Features(ResNetFeatures):
    name = "resnet50"
    arch = "resnet50"
    description = "layer1..4 of the resnet50 classifier trained on image labels (Table 2), gathered / streamed"


@hookimpl
def register_backbones(register):
    register(ResNet18Features)
    register(ResNet50Features)
