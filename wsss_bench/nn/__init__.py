"""Shared networks and training loops.

- :mod:`wsss_bench.nn.classifier`: the CAM classifier of docs/methods/conventions.md (build, train,
  predict).
- :mod:`wsss_bench.nn.cam`: the template every CAM method derives from (hooks, one backward,
  per-layer maps).

Importing this package (or its modules) does not import torch; that happens on first use.
"""
