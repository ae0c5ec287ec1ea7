"""Shared by the classifier-CAM tests: the smoke-profile ResNet they run on."""
from __future__ import annotations

import torch
import torch.nn as nn

from wsss_bench._compat import import_timm


def smoke_resnet(in_chans: int, seed: int = 0) -> nn.Module:
    """The smoke-profile CAM classifier shape: resnet18, widths (8,16,32,64), output stride 8."""
    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, in_chans=in_chans, num_classes=2,
                              output_stride=8, channels=(8, 16, 32, 64))
    with torch.no_grad():  # a positive class-1 row keeps most random maps non-degenerate
        model.fc.weight[1].abs_()
    return model.eval()
