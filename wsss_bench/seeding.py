"""Per-component seeds (docs/protocol.md section 12).

seed(component) = first 8 bytes of sha256(f"{base_seed}|{task}|{component}"), little-endian,
mod 2**63.  Every stage derives its own seed, so adding a stage never shifts another's.
"""
from __future__ import annotations

import hashlib
import os

from wsss_bench.lazy import torch


def derive_seed(base_seed: int, task: str, component: str) -> int:
    digest = hashlib.sha256(f"{base_seed}|{task}|{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def generator(seed: int, device: str = "cpu"):
    """A torch.Generator seeded with ``seed`` on ``device``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def set_determinism(seed: int, device: str = "cpu") -> None:
    """Seed every global RNG (MONAI helper) and ask torch for deterministic kernels on CPU."""
    from monai.utils import set_determinism as monai_set_determinism

    monai_set_determinism(seed=seed % (2**32))
    if str(device).startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
