"""Make ``import torchvision`` work next to the CPU build of torch.

Why this exists: the project pins the local CPU wheel ``torch==2.13.0``; the only
``torchvision==0.28.0`` on PyPI is the CUDA build, whose Python side registers fake
kernels for ``torchvision::nms`` / ``qnms`` before its compiled library has defined
those operators, so the import dies with "operator torchvision::nms does not exist".
timm imports torchvision, so every model would fail.  Declaring the two operator
schemas first lets the import proceed (the ops themselves are never used here).

Only applied when that exact error occurs, so a matching torch/torchvision pair is
left untouched.
"""
from __future__ import annotations

import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_lib = None  # keeps the Library alive; its definitions vanish when it is collected


def ensure_torchvision() -> None:
    """Import torchvision, declaring the missing op schemas if (and only if) needed."""
    global _lib
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "__version__"):
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _lib = torch.library.Library("torchvision", "FRAGMENT")
    for op, schema in _SCHEMAS.items():
        try:
            _lib.define(schema)
        except RuntimeError:  # already defined by a partial load
            pass
    import torchvision  # noqa: F401,F811


def import_timm():
    """``import timm`` after making sure torchvision imports."""
    ensure_torchvision()
    import timm

    return timm
