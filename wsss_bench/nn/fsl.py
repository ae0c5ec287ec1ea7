"""The fully supervised upper bound (docs/methods/fsl.md): a UNet trained on ground-truth masks.

Network: ``monai.networks.nets.UNet(spatial_dims=2, in_channels=C, out_channels=2,
channels, strides=(2,) * (len(channels) - 1), num_res_units, norm="batch")`` with the
profile's ``fsl`` values (paper: (32, 64, 128, 256, 512), 2 residual units).

Training: every non-ambiguous training slice with its ground-truth mask (the one place in the
benchmark that reads training masks), ``DiceCELoss(to_onehot_y=True, softmax=True)``, Adam
lr 1e-3, weight decay 1e-5, batch and iterations from the profile, the last weights kept;
left-right flips of image and mask together on BraTS (docs/methods/conventions.md) [inferred].
Prediction: argmax over the two output channels.

:func:`train_fsl` is the single training path: the plugin and the mechanism test (a fixed
square as the "mask") both drive it.  Resumable through
:func:`wsss_bench.nn.training.run_resumable`.  Importing this module imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from wsss_bench.metrics import dice_iou
from wsss_bench.nn import training

Tensor = torch.Tensor

LR = 1e-3
WEIGHT_DECAY = 1e-5
OUT_CHANNELS = 2


def unet_kwargs(spec: Mapping[str, Any], in_channels: int) -> dict[str, Any]:
    """MONAI UNet arguments from a profile's ``fsl`` section (docs/methods/fsl.md)."""
    channels = tuple(int(c) for c in spec["channels"])
    if len(channels) < 2:
        raise ValueError(f"fsl.channels needs at least two levels, got {list(channels)}")
    return dict(spatial_dims=2, in_channels=int(in_channels), out_channels=OUT_CHANNELS, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=int(spec["res_units"]), norm="batch")


def build_fsl(spec: Mapping[str, Any], in_channels: int, seed: int | None = None):
    """A freshly initialised UNet; ``seed`` leaves the global RNG alone."""
    from monai.networks.nets import UNet

    kwargs = unet_kwargs(spec, in_channels)
    if seed is None:
        return UNet(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2**63))
        return UNet(**kwargs)


def _training():
    return training


def train_fsl(model, data: Any, idx: Sequence[int], spec: Mapping[str, Any], device: Any, seed: int, work: Path,
              flips: bool, bf16: bool = False, progress: Callable[[int], Any] | None = None,
              iterations: int | None = None, every: int | None = None, rule: Any = None,
              ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Supervised training on rows ``idx`` of ``data``; ``data.batches(..., with_masks=True)`` gives masks.

    ``spec["iterations"]`` is the step cap; the convergence ``rule`` (default: patience 5,
    delta 0.002, one evaluation per 10% of the cap) scores the mean per-slice Dice on the
    validation split (the protocol's empty rule: an empty prediction on an empty mask is 1),
    the only criterion that reads masks, keeps the best weights and stops on a plateau.
    """
    from monai.losses import DiceCELoss

    tr = _training()
    dev = torch.device(device)
    model.to(dev)
    batch = int(spec["batch"])
    iterations = int(spec["iterations"] if iterations is None else iterations)
    batches = tr.IterationBatches(data, idx, batch, seed, dev, with_masks=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(it: int) -> float:
        b = batches.get(it)
        if b.masks is None:
            raise RuntimeError("FSL training batch came without masks")
        x = b.images.to(dev).float()
        y = b.masks.to(dev)[:, None].float()  # (B, 1, S, S) in {0, 1}
        if flips:
            g = tr.iteration_generator(seed, it)
            flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(dev)[:, None, None, None]
            x, y = torch.where(flip, x.flip(-1), x), torch.where(flip, y.flip(-1), y)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(bf16)):
            logits = model(x)  # (B, 2, S, S)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    val_idx = data.split("val")

    def val_dice(m) -> tuple[float | None, None]:
        scores = []
        for b in data.batches(val_idx, batch, shuffle=False, device=str(dev), with_masks=True):
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(bf16)):
                pred = m(b.images.to(dev).float()).argmax(dim=1) == 1
            scores.append(dice_iou(pred.cpu(), b.masks.cpu())[0])
        return (float(np.concatenate(scores).mean()) if scores else None), None

    if rule is None:
        rule = tr.rule_from_profile({}, spec, "score", default_every=max(1, iterations // 10))
    criterion = tr.Criterion("val Dice (mean over validation slices; reads validation masks)", val_dice)
    weights, info = tr.run_resumable(work, model, opt, iterations, step, 0.0, progress, every=every,
                                     criterion=criterion, rule=rule)
    info.update(batch=batch, lr=LR, weight_decay=WEIGHT_DECAY, loss="DiceCELoss(to_onehot_y, softmax)",
                flips=bool(flips), bf16=bool(bf16), n_train=int(len(batches.idx)))
    return weights, info


def predict(model, images: Tensor) -> Tensor:
    """(B, S, S) bool: argmax of the two output channels is the foreground."""
    with torch.no_grad():
        return model(images.float()).argmax(dim=1) == 1


__all__ = ["build_fsl", "train_fsl", "predict", "unet_kwargs"]
