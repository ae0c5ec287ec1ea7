"""The CAM classifier (docs/methods/conventions.md): a timm ResNet trained on image-level labels.

Shared by GradCAM, GradCAM++, ScoreCAM, LayerCAM, the classifier gate and the Table 2
ResNet row.  Recipe [inferred, AME-CAM's]: cross-entropy over 2 classes; Adam lr 1e-4,
weight decay 1e-5; cosine decay to 5e-6 over all steps; epochs and batch from the profile's
``classifier`` section (the epochs are a step cap); random horizontal flips only where the
task allows them (BraTS).  Training stops by the convergence rule of
:mod:`wsss_bench.nn.training` on the validation criterion "val AUC of softmax p(1), val
cross-entropy as the tie-break", evaluated every ``classifier.eval_every`` steps; the best
evaluation's weights are kept.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from wsss_bench._compat import import_timm
from wsss_bench.lazy import F, np, torch
from wsss_bench.nn.training import (Criterion, IterationBatches, auc_and_loss, iteration_generator, random_flips,
                                    rule_from_profile, rule_params, run_resumable)

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch as _torch

    from wsss_bench.interfaces import SliceBatch

LR = 1e-4
WEIGHT_DECAY = 1e-5
LR_MIN = 5e-6
NUM_CLASSES = 2


def build_classifier(spec: Mapping[str, Any], in_chans: int, seed: int | None = None) -> "_torch.nn.Module":
    """A randomly initialised classifier from a profile's ``cam_classifier``-style section.

    ``spec`` has ``arch`` (a timm model name), ``channels`` (stage widths; empty = the
    architecture's full width) and ``output_stride``.  No pretrained weights are downloaded.
    With ``seed`` the initialisation is reproducible and the global RNG is left untouched.
    """
    timm = import_timm()
    kwargs: dict[str, Any] = dict(
        pretrained=False,
        in_chans=int(in_chans),
        num_classes=NUM_CLASSES,
        output_stride=int(spec.get("output_stride", 32)),
    )
    channels = list(spec.get("channels") or [])
    if channels:
        kwargs["channels"] = tuple(int(c) for c in channels)
    if seed is None:
        return timm.create_model(spec["arch"], **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2**63))
        return timm.create_model(spec["arch"], **kwargs)


def _n_train_batches(n: int, batch: int) -> int:
    return max(1, math.ceil(n / batch))


def classifier_steps(n_train: int, profile: Any) -> int:
    """Step cap of :func:`train_classifier` for ``n_train`` slices (progress total)."""
    cfg = profile.classifier
    return int(cfg.epochs) * _n_train_batches(n_train, int(cfg.batch))


def _forward_p1(model, batches: Iterable["SliceBatch"], device, bf16: bool):
    """(p1, labels) numpy arrays over ``batches``, model in eval, no autograd."""
    probs, labels = [], []
    dev = torch.device(device)
    model.eval()
    with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
        for b in batches:
            logits = model(b.images.to(dev, non_blocking=True))
            probs.append(F.softmax(logits.float(), dim=1)[:, 1].cpu())
            labels.append(b.labels.cpu())
    if not probs:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def predict_p1(model, batches: Iterable["SliceBatch"], bf16: bool = False) -> "numpy.ndarray":
    """Softmax probability of class 1 for every slice in ``batches`` (model's device)."""
    device = next(model.parameters()).device
    return _forward_p1(model, batches, device, bf16)[0]


def _auc(labels, p1) -> float | None:
    """ROC AUC, or None when the labels hold a single class (AUC undefined)."""
    if len(np.unique(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, p1))


def train_classifier(
    model,
    data: Any,
    profile: Any,
    device: Any,
    seed: int,
    flips: bool,
    bf16: bool = False,
    progress: Callable[[int], Any] | None = None,
    work: "Path | str | None" = None,
) -> tuple[dict[str, "_torch.Tensor"], dict[str, Any]]:
    """Train ``model`` on ``data``'s train split; return (kept state dict on CPU, info).

    ``data`` is a TaskData (or its mask-free view): ``split(name)`` gives row indices,
    ``batches(idx, batch_size, device=...)`` yields SliceBatch.  Runs on the shared resumable
    loop (:func:`wsss_bench.nn.training.run_resumable`) with checkpoints in ``work`` (a
    temporary folder when None): every epoch reshuffles with a generator of (seed, epoch),
    each step's flips come from a generator of (seed, step), so a killed build resumes
    bit-identically.  The profile's epochs are the step cap; the convergence rule scores the
    validation AUC of p(1) (tie-break: validation cross-entropy) every ``eval_every`` steps
    (one epoch when the profile section has none), keeps the best evaluation's weights and
    stops on a plateau.  If the validation split holds one class only, the AUC is undefined:
    training runs to the cap, the last weights are kept and ``info["selection"]`` says so.
    On return the model holds the kept weights and is in eval mode.  ``progress(1)`` is
    called after every optimisation step (:func:`classifier_steps` gives the cap).

    info: ``train_loss`` per checkpoint, ``val_auc`` per evaluation (None where undefined),
    ``best_step``, ``best_val_auc``, ``selection``, ``steps`` (run), ``cap``, ``convergence``
    (the rule's record), ``n_train``, ``n_val``, ``seconds``, ``bf16``.
    """
    cfg = profile.classifier
    epochs, batch_size = int(cfg.epochs), int(cfg.batch)
    dev = torch.device(device)
    model.to(dev)

    train_idx = np.asarray(data.split("train"))
    val_idx = np.asarray(data.split("val"))
    if len(train_idx) == 0:
        raise ValueError("train_classifier: the train split is empty")
    batches = IterationBatches(data, train_idx, batch_size, seed, dev, drop_last=False)
    steps_per_epoch = batches.per_epoch
    total_steps = epochs * steps_per_epoch
    rule = rule_from_profile(profile, cfg, "score", default_every=steps_per_epoch)

    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=LR_MIN)

    def step(it: int) -> float:
        b = batches.get(it)
        x = b.images.to(dev, non_blocking=True)  # (B, C, S, S)
        y = b.labels.to(dev, non_blocking=True).long()  # (B,)
        if flips:
            x = random_flips(x, iteration_generator(seed, it))
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def evaluate(m) -> tuple[float | None, float | None]:
        p1, labels = _forward_p1(m, data.batches(val_idx, batch_size, shuffle=False, device=str(dev)), dev, bf16)
        return auc_and_loss(labels, p1)

    criterion = Criterion("val AUC of softmax p(1); tie-break val cross-entropy", evaluate)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wsss-classifier-") as tmp:
        weights, run = run_resumable(Path(work) if work is not None else Path(tmp), model, opt, total_steps, step,
                                     progress=progress, sched=sched, criterion=criterion, rule=rule)
    conv = run["convergence"]
    val_auc = [point[2] for point in conv["curve"]]
    if conv["kept_step"] is None:  # validation has one class (or is empty): keep the last weights
        selection = "last step (validation split has a single class; AUC undefined)"
    else:
        selection = "best validation AUC of p(1) (tie-break: validation cross-entropy)"
    model.load_state_dict(weights)
    model.eval()

    info = {
        "train_loss": [loss for _, loss in run["loss_log"]],
        "val_auc": val_auc,
        "best_step": conv["kept_step"],
        "best_val_auc": conv["best"],
        "selection": selection,
        "steps": run["iterations"],
        "cap": total_steps,
        "convergence": conv,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "epochs_cap": epochs,
        "batch": batch_size,
        "flips": bool(flips),
        "bf16": bool(bf16),
        "seconds": time.perf_counter() - t0,
        "resumed_from": run["resumed_from"],
    }
    return weights, info


def get_classifier(ctx: Any) -> "_torch.nn.Module":
    """The task's CAM classifier (docs/methods/conventions.md), a shared model: trained once per task,
    seed, data and profile, cached as safetensors, resumable, memoised on the context.

    Returned frozen, in eval, on ``ctx.device``; gradients with respect to inputs and
    activations still flow (GradCAM-style methods need them).
    """
    spec, recipe = dict(ctx.profile.cam_classifier), dict(ctx.profile.classifier)
    module = sys.modules[__name__]

    def build():
        return build_classifier(ctx.profile.cam_classifier, ctx.task.channels, seed=ctx.seed("init/classifier"))

    def train(model, run):
        return train_classifier(model, ctx.data, ctx.profile, run.device, run.seed, flips=ctx.task.flips,
                                bf16=ctx.bf16, progress=run.advance, work=run.work)

    n_train = len(ctx.data.split("train"))
    params = {**spec, **recipe, **rule_params(ctx.profile, ctx.profile.classifier)}
    return ctx.shared_model("classifier", build, train, params=params, source=[module],
                            total=classifier_steps(n_train, ctx.profile))
