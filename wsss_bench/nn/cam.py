"""The CAM template: one base class, a method overrides one small function.

The idea is pytorch-grad-cam's ``BaseCAM``, written torch-native and batched: tensors stay
on the model's device and nothing goes through numpy.

What the base does for a batch of images (docs/methods/gradcam.md and docs/methods/gradcampp.md and docs/methods/scorecam.md and docs/methods/layercam.md):

1. forward the classifier (in eval) with forward hooks on the named target layers; each
   hook keeps the layer's output A (B, K, h, w) and registers a *tensor* hook on it for the
   gradient (timm ResNets use in-place ReLU, so module full-backward hooks are unreliable,
   see pytorch/pytorch#61519);
2. score y_b = raw logit of class 1 for every image (the positive class, also on negative
   slices); one backward of sum_b y_b serves the whole batch;
3. hand each layer's (A, dy/dA) to :meth:`CamExtractor.layer_map`, the one function a
   gradient method overrides, giving a raw (B, h, w) map per layer;
4. :meth:`CamExtractor.fuse` turns the per-layer maps into (B, S, S) maps in [0, 1]:
   for one layer minmax(Up(map)); LayerCAM overrides it for its multi-layer fusion.

:class:`ClassifierCam` is the plugin side of the template: the CAM source that gets the
shared CAM classifier from ``get_classifier(ctx)``, checks the layer parameter and builds the
method's extractor; GradCAM, GradCAM++, ScoreCAM and LayerCAM keep only what differs.

Speed: the gradient is needed only from the target layer upwards, so everything up to and
including the first target layer runs under ``no_grad``; its output is re-entered into
autograd as a fresh leaf, and the backward (``torch.autograd.grad`` to that leaf) touches
neither the earlier layers nor any parameter gradient.  Gradients at the target layers are
identical to a full backward.  Methods that need no gradient (ScoreCAM) set
``needs_grads = False`` and the whole forward runs without autograd.

Importing this module does not import torch.
"""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from wsss_bench.errors import PluginError
from wsss_bench.interfaces import CamSource, SliceBatch
from wsss_bench.lazy import torch
from wsss_bench.maps import minmax, upsample
from wsss_bench.nn.classifier import get_classifier

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

    Tensor = _torch.Tensor
    Module = _torch.nn.Module

#: the positive class (docs/methods/conventions.md)
POSITIVE_CLASS = 1


def resolve_layers(model: "Module", names: Sequence[str], owner: str = "") -> list["Module"]:
    """The submodules of ``model`` called ``names`` (as in ``model.named_modules()``).

    An unknown name raises a PluginError that lists the valid top-level names (``conv1``,
    ``layer1`` .. ``layer4`` for a ResNet), says dotted names such as ``layer4.1`` also work
    and suggests the closest match.  ``owner`` prefixes the message (e.g. the plugin).
    """
    modules = dict(model.named_modules())
    found = []
    for name in names:
        if not isinstance(name, str) or not name or name not in modules:
            top = [n for n, _ in model.named_children()]
            close = difflib.get_close_matches(str(name), [n for n in modules if n], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            prefix = f"{owner}: " if owner else ""
            raise PluginError(
                f"{prefix}unknown target layer {name!r}{hint} in {type(model).__name__}; "
                f"valid layers are {', '.join(top)} "
                f"(or a dotted submodule name such as '{_example_dotted(modules, top)}')"
            )
        found.append(modules[name])
    return found


def split_layer_names(value: "str | Sequence[str]") -> list[str]:
    """Layer names from a parameter value: ``"layer4"``, ``"layer3+layer4"``, ``"layer3,layer4"``
    or a list of such strings.

    In spec strings several layers are joined with ``+`` (``layercam[layers=layer3+layer4]``);
    a comma works inside quotes (``layercam[layers='layer3,layer4']``) or from Python.
    Raises PluginError for an empty name; whether a name exists is checked later, against
    the model, by :func:`resolve_layers`.
    """
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise PluginError(f"layer names must be strings, got {item!r}")
        names += [part.strip() for part in item.replace(",", "+").split("+")]
    if not names or any(not n for n in names):
        raise PluginError("must name one or more modules of the classifier, e.g. layer4 or layer3+layer4")
    return names


def _example_dotted(modules: dict, top: list[str]) -> str:
    dotted = [n for n in modules if n.count(".") == 1]
    return dotted[-1] if dotted else (top[-1] if top else "layer4")


#: pytorch-grad-cam's epsilon when it scales each layer's map (docs/methods/layercam.md, library)
LIBRARY_LAYER_EPS = 1e-7


def library_fusion(maps: Sequence["Tensor"], size: tuple[int, int]) -> "Tensor":
    """pytorch-grad-cam 1.5.7's multi-layer aggregation, (B, S, S) in [0, 1].

    Per layer (B, h_l, w_l): (cam - min) / (max - min + 1e-7) at the layer's own resolution,
    then Up to ``size``; the mean over layers is min-max scaled again.  Scaling before the
    resize matters: bilinear upsampling need not reach an interior maximum, so min-max after
    Up would rescale each layer differently.
    """
    scaled = []
    for cam in maps:
        flat = cam.reshape(cam.shape[0], -1)
        lo = flat.amin(dim=1).view(-1, 1, 1)
        hi = flat.amax(dim=1).view(-1, 1, 1)
        scaled.append(upsample((cam - lo) / (hi - lo + LIBRARY_LAYER_EPS), size))
    return minmax(torch.stack(scaled, 0).mean(0))


class CamExtractor:
    """Template for activation-map methods on a classifier.

    Subclasses override :meth:`layer_map` (and nothing else for a single-layer method).
    While a call runs, ``self.inputs`` holds the (B, C, S, S) images on the model's device,
    for methods such as ScoreCAM whose layer map re-runs the model on masked inputs.

    ``layers`` is one module name or a list of them; ``target_class`` is the class whose
    raw logit is differentiated (1 = positive, for every image).
    """

    #: False for gradient-free methods (ScoreCAM): the forward runs entirely without autograd
    needs_grads: ClassVar[bool] = True

    def __init__(
        self,
        model: "Module",
        layers: str | Sequence[str],
        target_class: int = POSITIVE_CLASS,
        owner: str = "",
    ) -> None:
        self.model = model.eval()
        self.layer_names: list[str] = [layers] if isinstance(layers, str) else list(layers)
        if not self.layer_names:
            raise PluginError(f"{owner + ': ' if owner else ''}no target layer given")
        self.layers = resolve_layers(model, self.layer_names, owner)
        self.target_class = int(target_class)
        self.owner = owner
        self.inputs: "Tensor | None" = None
        #: indices into ``layer_names`` in the order the layers ran in the last forward
        #: (the last one is the deepest); empty before the first call
        self.forward_order: list[int] = []

    # ------------------------------------------------------------------ what a method overrides
    def layer_map(self, acts: "Tensor", grads: "Tensor | None") -> "Tensor":
        """Raw map (B, h', w') of one layer from its activations and gradients (B, K, h, w).

        ``grads`` is dy/dA for y = logit[target_class] summed over the batch (None when
        ``needs_grads`` is False).  Any resolution is fine; :meth:`fuse` resizes.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement layer_map(acts, grads)")

    def fuse(self, maps: list["Tensor"], size: tuple[int, int]) -> "Tensor":
        """Per-layer raw maps -> (B, S, S) in [0, 1].

        One layer: minmax(Up(map)).  Several layers: pytorch-grad-cam's aggregation
        (:func:`library_fusion`); LayerCAM overrides this for its paper fusion.
        """
        if len(maps) == 1:
            return minmax(upsample(maps[0], size))
        return library_fusion(maps, size)

    # ------------------------------------------------------------------ the template
    def capture(self, images: "Tensor") -> tuple["Tensor", list["Tensor"], list["Tensor | None"]]:
        """(logits (B, n_classes), activations per layer, gradients per layer or Nones).

        Activations and gradients are detached and stay on the model's device.
        """
        n = len(self.layers)
        acts: list[Any] = [None] * n
        grads: list[Any] = [None] * n
        calls = [0] * n
        leaf: list[Any] = []  # the re-entered output of the first target layer to run
        passed: list[Any] = []  # the copies handed on, which carry the gradients

        order: list[int] = []

        def forward_hook(i: int):
            def hook(module, inputs, output):
                calls[i] += 1
                order.append(i)
                if not torch.is_tensor(output):
                    raise PluginError(
                        f"{self.owner + ': ' if self.owner else ''}target layer "
                        f"'{self.layer_names[i]}' returns {type(output).__name__}, not a tensor"
                    )
                # The layer's successors get a copy of its output, so an in-place op there
                # (timm's ``x += shortcut`` after ``bn2``, in-place ReLUs) cannot alter A.
                if not self.needs_grads:
                    acts[i] = output.detach()
                    return output.clone()
                if not leaf:
                    # First target layer in forward order: everything so far ran without a
                    # graph.  Start recording here, from a fresh leaf.
                    torch.set_grad_enabled(True)
                    output = output.detach().requires_grad_(True)
                    leaf.append(output)
                acts[i] = output.detach()
                passed_on = output.clone()

                def save_grad(g, i=i):
                    grads[i] = g.detach()

                passed_on.register_hook(save_grad)  # dy/dA: the copy carries A's gradient
                passed.append(passed_on)
                return passed_on

            return hook

        handles = [layer.register_forward_hook(forward_hook(i)) for i, layer in enumerate(self.layers)]
        device = self._device()
        prev = torch.is_grad_enabled()
        try:
            with torch.inference_mode(False):
                self.inputs = images = images.to(device)
                torch.set_grad_enabled(False)  # the first target layer's hook turns it back on
                logits = self.model(images)
                bad = [f"'{self.layer_names[i]}' ran {calls[i]} times" for i in range(n) if calls[i] != 1]
                if bad:
                    raise PluginError(
                        f"{self.owner + ': ' if self.owner else ''}target layers must run exactly "
                        f"once per forward: {', '.join(bad)}"
                    )
                self.forward_order = order
                if self.needs_grads:
                    score = logits[:, self.target_class].sum()
                    # Differentiating to the leaf and the copies runs exactly the graph above
                    # the target layers; the tensor hooks collect dy/dA on the way.
                    torch.autograd.grad(score, leaf + passed, allow_unused=True)
                    logits = logits.detach()
                    unused = [self.layer_names[i] for i in range(n) if grads[i] is None]
                    if unused:
                        raise PluginError(
                            f"{self.owner + ': ' if self.owner else ''}the class-{self.target_class} "
                            f"logit does not depend on target layer(s) {', '.join(unused)}"
                        )
        finally:
            torch.set_grad_enabled(prev)
            for h in handles:
                h.remove()
        return logits, acts, grads

    def layer_maps(self, images: "Tensor") -> list["Tensor"]:
        """Raw per-layer maps (each (B, h, w)) for ``images`` (B, C, S, S), in layer order."""
        try:
            _, acts, grads = self.capture(images)
            with torch.no_grad():
                return [self.layer_map(a, g) for a, g in zip(acts, grads)]
        finally:
            self.inputs = None

    def __call__(self, images: "Tensor", size: int | Sequence[int] | None = None) -> "Tensor":
        """(B, S, S) maps in [0, 1] at ``size`` (default: the images' size)."""
        if size is None:
            size = tuple(images.shape[-2:])
        elif isinstance(size, int):
            size = (size, size)
        raw = self.layer_maps(images)
        with torch.no_grad():
            return self.fuse(raw, tuple(size))

    def _device(self):
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device("cpu")


class ClassifierCam(CamSource):
    """A CAM source on the shared CAM classifier (docs/methods/conventions.md): the common plugin part.

    ``prepare`` gets the trained classifier from ``get_classifier(ctx)`` and builds
    ``extractor_class`` on the layers named by the parameter ``layer_param``; ``maps`` runs
    the extractor on a batch at the images' size.  A method sets ``extractor_class`` (and
    ``layer_param`` if it is not ``layer``) and overrides :meth:`extractor_options` for
    its own options (a fusion, a variant, a chunk size), :meth:`validate` for its own
    parameters (calling ``super().validate()``) and :meth:`prepare` for extra checks
    after ``super().prepare(ctx)``.
    """

    #: the method's CamExtractor subclass
    extractor_class: ClassVar[type[CamExtractor]] = CamExtractor
    #: the parameter that names the target layer(s): "layer4", "layer3+layer4", ...
    layer_param: ClassVar[str] = "layer"
    mask_rule: ClassVar[str] = "cam"  # minmax(map) > 0.5 (docs/protocol.md section 6)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "no_grad" not in cls.__dict__:  # gradient methods need autograd inside maps()
            cls.no_grad = not cls.extractor_class.needs_grads

    def validate(self) -> None:
        try:
            self.layers = split_layer_names(self.p[self.layer_param])
        except PluginError as err:
            raise self.bad_param(self.layer_param, str(err)) from None
        if len(set(self.layers)) != len(self.layers):
            raise self.bad_param(self.layer_param, "names a layer twice")

    def extractor_options(self, ctx: "RunContext") -> dict[str, Any]:
        """Keyword arguments of ``extractor_class`` besides model, layers and owner."""
        return {}

    def prepare(self, ctx: "RunContext") -> None:
        self.model = get_classifier(ctx)  # trained, eval mode, on ctx.device
        self.extractor = self.extractor_class(
            self.model, self.layers, owner=f"cam plugin '{self.name}' (parameter {self.layer_param})",
            **self.extractor_options(ctx),
        )

    def maps(self, batch: SliceBatch) -> "Tensor":
        images = batch.images
        return self.extractor(images, size=tuple(images.shape[-2:]))  # (B, S, S) in [0, 1]
