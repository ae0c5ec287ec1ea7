"""ScoreCAM (Wang et al. 2020), docs/methods/scorecam.md.

Network: the shared CAM classifier (docs/methods/conventions.md).  Target: the output A (K x h x w)
of ``layer`` (default ``layer4``); class 1, the positive class, for every image.  No
gradient is used: each channel is scored by re-running the classifier on the input masked
by that channel's upsampled, min-max scaled activation.

``variant=paper`` (Table 1; Wang et al. 2020, the increase in confidence C(A_k)):

    U_k = Up(A_k)                                   (bilinear, align_corners=False)
    s_k = 0                                         if max U_k - min U_k < 1e-8
    s_k = softmax(f(x * minmax(U_k)))[1]            otherwise: the increase in confidence
          - softmax(f(X_b))[1]                      over the baseline X_b = 0
    cam = ReLU(sum_k s_k U_k)                       at input resolution -> minmax

The baseline X_b is the all-zero image: the input under an empty mask (x * 0), i.e. the
limit of the masked inputs as H_k -> 0, and the background intensity of both datasets
after preprocessing [inferred; the paper says only "a known baseline input"].  f(X_b) is
one forward pass per batch.  Where no channel raises the confidence (every s_k <= 0) the
map is ReLU(<= 0) = 0 and minmax gives the all-zero map (an empty mask), never NaN.

``variant=official`` (the official code, haofanwang/Score-CAM; this plugin's ``paper``
before version 2): as ``paper`` without the baseline term, s_k = softmax(f(x * H_k))[1].

``variant=library`` (pytorch-grad-cam 1.5.7):

    U_k = Up(A_k) with align_corners=True
    H_k = (U_k - min) / (max - min + 1e-8)
    s_k = f(x * H_k)[1]                             the raw logit
    w   = softmax over the K channels of s
    cam = ReLU(sum_k w_k A_k)                       at activation resolution -> Up -> minmax

Mask: minmax(cam) > 0.5 (docs/protocol.md section 6).

Hyperparameter: ``chunk``, how many masked inputs go through the classifier at once
(profile ``scorecam.chunk``: 64 paper, 128 cpu and smoke; ``chunk=0`` takes the profile's).
The masked inputs of all images and channels of a batch are queued together and run in
chunks under ``torch.inference_mode()``; tensors stay on the model's device.

Speed.  Nothing below changes what is computed (the maps agree up to float rounding, as
they do for any other chunk size):

- the maps are never materialised as (B, K, S, S): masks are built chunk by chunk into one
  reused buffer, and the paper's ``sum_k s_k Up(A_k)`` is computed as ``Up(sum_k s_k A_k)``
  (Up is linear);
- on CPU the masked inputs are laid out channels-last, which runs the same convolutions
  10-35% faster there (the values agree up to float rounding, like any change of batch);
- ``paper`` / ``official``: a channel whose map is constant gets weight 0 without a forward pass.  U_k is
  constant exactly when A_k is (upsampling is injective), so A_k is tested too: float
  interpolation of a constant map can wobble by one ulp, which min-max would otherwise blow
  up into a meaningless full-range mask;
- ``library``: an all-zero channel (a dead ReLU unit, a third of layer4 in a random
  ResNet18 at 64 px) has H_k = 0 exactly, so its masked input is the zero image for every
  image: its score f(0)[1] is computed once per batch.

Constant channels give finite maps in every variant (the NaN of pytorch-grad-cam #173
cannot occur: paper and official never divide by a zero range, library adds 1e-8).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsss_bench.errors import PluginError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.lazy import F, torch
from wsss_bench.maps import FLAT_RANGE
from wsss_bench.nn.cam import POSITIVE_CLASS, CamExtractor, ClassifierCam

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    from wsss_bench.context import RunContext

VARIANTS = ("paper", "official", "library")
#: docs/methods/scorecam.md: masked inputs per forward when neither the parameter nor a profile says
DEFAULT_CHUNK = 64
#: pytorch-grad-cam's epsilon in the library variant's mask scaling
LIBRARY_EPS = 1e-8


class ScoreCAMExtractor(CamExtractor):
    """ScoreCAM's layer map: channels weighted by the class score of their masked input.

    ``variant`` is ``paper``, ``official`` or ``library`` (see the module docstring); ``chunk`` is the
    number of masked inputs per forward pass.  After each call, ``last_stats`` holds, per
    target layer, the number of channels, of masked forward passes run and of channels
    skipped as constant.

    ``skip_constant=False`` forwards every channel, for timing the shortcut (benchmarks):
    the library variant's maps are unchanged; paper and official still give a channel with
    a constant *upsampled* map weight 0, but score one whose constant map wobbles by an
    ulp after upsampling.
    """

    #: skip the forward passes of constant channels (they do not change the output)
    skip_constant: bool = True
    #: lay the masked inputs out channels-last; None = on CPU only, where oneDNN's
    #: convolutions and pooling run 10-35% faster that way (benchmarks/perf_cams.py)
    channels_last: "bool | None" = None

    needs_grads = False

    def __init__(
        self,
        model: "_torch.nn.Module",
        layers: "str | list[str]",
        variant: str = "paper",
        chunk: int = DEFAULT_CHUNK,
        target_class: int = POSITIVE_CLASS,
        owner: str = "",
    ) -> None:
        super().__init__(model, layers, target_class=target_class, owner=owner)
        if variant not in VARIANTS:
            raise PluginError(f"{owner + ': ' if owner else ''}unknown ScoreCAM variant {variant!r}; "
                              f"use one of {', '.join(VARIANTS)}")
        if int(chunk) < 1:
            raise PluginError(f"{owner + ': ' if owner else ''}chunk must be >= 1, got {chunk}")
        self.variant = variant
        self.chunk = int(chunk)
        self.last_stats: list[dict[str, int]] = []

    # ------------------------------------------------------------------ the one override
    def layer_map(self, acts: "_torch.Tensor", grads: None) -> "_torch.Tensor":
        if self.variant in ("paper", "official"):
            weights = self.paper_weights if self.variant == "paper" else self.official_weights
            s = weights(self.inputs, acts)  # (B, K)
            size = tuple(self.inputs.shape[-2:])
            cam = torch.einsum("bk,bkhw->bhw", s, acts)  # = sum_k s_k U_k before Up
            return F.relu(_up(cam[:, None], size, align_corners=False)[:, 0])  # (B, S, S)
        w = self.library_weights(self.inputs, acts)  # (B, K), rows sum to 1
        return F.relu((w[:, :, None, None] * acts).sum(dim=1))  # (B, h, w)

    def __call__(self, images, size=None):
        self.last_stats = []
        return super().__call__(images, size)

    # ------------------------------------------------------------------ channel scores
    def official_weights(self, x: "_torch.Tensor", acts: "_torch.Tensor") -> "_torch.Tensor":
        """s (B, K): softmax(f(x * minmax(Up(A_k))))[target], 0 for constant channels."""
        return self._probabilities(x, acts)[0]

    def paper_weights(self, x: "_torch.Tensor", acts: "_torch.Tensor") -> "_torch.Tensor":
        """s (B, K): softmax(f(x * minmax(Up(A_k))))[target] - softmax(f(X_b))[target], X_b = 0.

        A constant channel has no mask (min-max is undefined), hence no increase: weight 0.
        """
        probs, scored = self._probabilities(x, acts)  # (B, K) each
        base = self.baseline_score(x).to(probs.dtype)  # scalar: X_b is the same for every image
        return torch.where(scored, probs - base, torch.zeros_like(probs))

    def _probabilities(self, x: "_torch.Tensor", acts: "_torch.Tensor") -> tuple["_torch.Tensor", "_torch.Tensor"]:
        """(class probabilities of the masked inputs, which channels were scored), both (B, K)."""
        flat = acts.flatten(2)
        active = (flat.amax(2) - flat.amin(2)) >= FLAT_RANGE  # (B, K); constant A_k => weight 0
        if not self.skip_constant:
            active = torch.ones_like(active)
        return self._masked_scores(x, acts, active, align_corners=False, eps=0.0, prob=True)

    def baseline_score(self, x: "_torch.Tensor") -> "_torch.Tensor":
        """softmax(f(X_b))[target] for the all-zero baseline image X_b of ``x``'s shape (one forward)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.inference_mode():
            logits = self.model(torch.zeros_like(x[:1])).to(dtype)  # (1, n_classes)
            p = torch.softmax(logits, dim=1)[0, self.target_class]
        return p.clone()

    def library_weights(self, x: "_torch.Tensor", acts: "_torch.Tensor") -> "_torch.Tensor":
        """w (B, K): softmax over channels of f(x * H_k)[target] (pytorch-grad-cam 1.5.7)."""
        zero = acts.flatten(2).eq(0).all(2)  # (B, K): H_k = 0 exactly, masked input = 0
        if not self.skip_constant:
            zero = torch.zeros_like(zero)
        scores, _ = self._masked_scores(x, acts, ~zero, align_corners=True, eps=LIBRARY_EPS, prob=False)
        if bool(zero.any()):
            with torch.inference_mode():
                blank = self.model(torch.zeros_like(x[:1]))[0, self.target_class]
            scores = torch.where(zero, blank.to(scores.dtype).clone(), scores)
        return torch.softmax(scores, dim=1)

    def _masked_scores(
        self, x: "_torch.Tensor", acts: "_torch.Tensor", active: "_torch.Tensor",
        align_corners: bool, eps: float, prob: bool,
    ) -> tuple["_torch.Tensor", "_torch.Tensor"]:
        """Score every active (image, channel) pair; inactive pairs score 0.

        The pairs of all images are queued image by image and forwarded ``chunk`` at a time.
        Returns the scores (B, K) and which pairs were scored (B, K) bool: the active ones
        whose upsampled map is not constant either (without eps, a constant U_k has no mask).
        """
        b, k = acts.shape[:2]
        size = tuple(x.shape[-2:])
        dtype = torch.promote_types(acts.dtype, torch.float32)  # float64 stays, bf16/half -> float32
        scores = torch.zeros(b, k, dtype=dtype, device=acts.device)
        scored = torch.zeros(b, k, dtype=torch.bool, device=acts.device)
        bi_all, ki_all = active.nonzero(as_tuple=True)  # (N,), (N,)
        n = int(bi_all.numel())
        forwards = 0
        cl = self.channels_last if self.channels_last is not None else x.device.type == "cpu"
        fmt = torch.channels_last if cl and x.ndim == 4 else torch.contiguous_format
        buf = torch.empty((min(self.chunk, max(n, 1)), *x.shape[1:]), dtype=x.dtype, device=x.device,
                          memory_format=fmt)  # one chunk of masked inputs, reused
        for start in range(0, n, self.chunk):
            bi, ki = bi_all[start:start + self.chunk], ki_all[start:start + self.chunk]
            u = _up(acts[bi, ki][:, None], size, align_corners)  # (n, 1, S, S)
            lo = u.amin(dim=(2, 3), keepdim=True)
            rng = u.amax(dim=(2, 3), keepdim=True) - lo
            if eps:
                mask = (u - lo) / (rng + eps)
                keep = None
            else:  # paper / official: min-max, weight 0 (and a zero mask) where the range is < 1e-8
                keep = rng.flatten() >= FLAT_RANGE
                mask = (u - lo) / torch.where(keep[:, None, None, None], rng, torch.ones_like(rng))
            with torch.inference_mode():
                masked = torch.mul(x[bi], mask, out=buf[: len(bi)])  # (n, C, S, S)
                logits = self.model(masked)  # (n, n_classes)
                logits = logits.to(dtype)
                s = (torch.softmax(logits, dim=1) if prob else logits)[:, self.target_class]
            forwards += len(bi)
            s = s.clone()  # a normal tensor again
            if keep is not None:
                s = torch.where(keep, s, torch.zeros_like(s))
            scores[bi, ki] = s
            scored[bi, ki] = True if keep is None else keep
        self.last_stats.append({"channels": b * k, "forwards": forwards, "skipped": b * k - n})
        return scores, scored


def _up(maps: "_torch.Tensor", size: tuple[int, int], align_corners: bool) -> "_torch.Tensor":
    """Bilinear resize of (n, c, h, w) maps to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=align_corners)


class ScoreCAM(ClassifierCam):
    """Classifier, layer check, extractor and maps come from ClassifierCam; ScoreCAM adds
    its variant and the chunk size."""

    name = "scorecam"
    version = "2"  # 2: variant=paper subtracts the baseline score (the old paper is official)
    params = {"layer": "layer4", "variant": "paper", "chunk": 0}
    description = "ScoreCAM on the shared CAM classifier (channels scored by masked forward passes)"
    extractor_class = ScoreCAMExtractor

    def validate(self) -> None:
        if self.p["variant"] not in VARIANTS:
            raise self.bad_param("variant", f"is not one of {', '.join(VARIANTS)}")
        if self.p["chunk"] < 0:
            raise self.bad_param("chunk", "must be >= 0 (0 = the profile's scorecam.chunk)")
        super().validate()

    def extractor_options(self, ctx: "RunContext") -> dict:
        self.chunk = self.p["chunk"] or profile_chunk(ctx)
        return {"variant": self.p["variant"], "chunk": self.chunk}


def profile_chunk(ctx: Any) -> int:
    """The profile's ``scorecam.chunk`` (docs/protocol.md section 10), else the spec's 64."""
    section = getattr(getattr(ctx, "profile", None), "scorecam", None)
    value = getattr(section, "chunk", None) if section is not None else None
    if value is None and isinstance(section, dict):
        value = section.get("chunk")
    return int(value) if value else DEFAULT_CHUNK


@hookimpl
def register_cam_sources(register):
    register(ScoreCAM)
