"""Data layer: NIfTI readers, preprocessing, slice store, splits, synthetic phantoms, and the
mask-free view plugins get.

Modules (import the one you need; this package imports none of them):

- ``taskdata``: :func:`load_task_data` -> :class:`TaskData`, ``ensure_phantom``
- ``readers``: :class:`BratsDataset`, :class:`Flare21Dataset`, ``BUILTIN_DATASETS``
- ``store``: :func:`prepare_slices`, :class:`SliceStore`; ``fingerprint``: :func:`data_fingerprint`
- ``phantom_brain``, ``phantom_abdomen``: the synthetic phantom writers
- ``view``: :class:`DataView`, the images and image-level labels a plugin sees

See docs/data.md.
"""
