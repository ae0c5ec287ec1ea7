"""The feature-backbone template, and a memory-mapped cache of its activations.

Every built-in backbone (``cdm``, ``unet-encoder``, ``resnet18``, ``resnet50``) computes a
list of native-resolution activation maps [(B, C_l, h_l, w_l)] for a batch of images; its
per-pixel feature is F = concat_l Up(a_l) at image resolution, D = sum_l C_l.  What differs
between backbones is only how the activations are computed, so :class:`ActivationBackbone`
(as :mod:`wsss_bench.nn.cam` does for CAMs) leaves exactly that to the subclass:

- the subclass implements ``prepare`` (load the network, then :meth:`set_geometry` with the
  image size and D) and :meth:`activations`;
- the base gives ``dim``, ``gather`` (features at chosen pixels, grid_sample on the native
  maps, never the dense (B, D, S, S) tensor) and ``stream`` (one image in pixel chunks).

The public contract for third-party backbones stays :class:`wsss_bench.interfaces.FeatureBackbone`
(``dim``, ``gather``, ``stream``); the template is a convenience, not a requirement.

**Activation cache** (:func:`build_activation_cache`, :class:`CachedActivations`): the
activations of a fixed set of slices written once into one ``np.lib.format.open_memmap``
file per block (``block<l>.npy``, (N, C_l, h_l, w_l) float32, plus ``rows.npy``).  Reading
them back and gathering with the same grid_sample gives the features the backbone would
stream, to float tolerance (only the batch composition of the forward pass differs), so a
consumer (CLDF's decoders) can train and infer from the cache instead of re-running the
frozen network on every batch.  Importing this module does not import torch.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from wsss_bench.interfaces import FeatureBackbone
from wsss_bench.lazy import np, torch
from wsss_bench.nn import diffusion_features as dfeat

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    Tensor = _torch.Tensor

#: the stored dtype: float32, so cached features equal streamed ones to float tolerance
CACHE_DTYPE = "float32"


class ActivationBackbone(FeatureBackbone):
    """A backbone given by its native-resolution activations; the base does dim, gather, stream."""

    #: set by :meth:`set_geometry` in ``prepare``
    size: int
    _dim: int

    def set_geometry(self, size: int, dim: int) -> None:
        """Record the image side S and the feature dimension D (call at the end of ``prepare``)."""
        self.size, self._dim = int(size), int(dim)

    @abc.abstractmethod
    def activations(self, images: "Tensor") -> list["Tensor"]:
        """Native-resolution activation maps [(B, C_l, h_l, w_l)] float32 of images (B, C, S, S)."""

    @property
    def dim(self) -> int:
        if not hasattr(self, "_dim"):
            raise RuntimeError(f"backbone '{self.name}': call prepare(ctx) before asking for dim")
        return self._dim

    def gather(self, images: "Tensor", coords: "Tensor") -> "Tensor":
        """(N, D) features at ``coords`` (N, 3) = (batch index, row, column)."""
        return dfeat.gather_from(self.activations(images), coords, self.size)

    def stream(self, image: "Tensor", chunk: int = dfeat.DEFAULT_CHUNK) -> Iterator[tuple[slice, "Tensor"]]:
        """(flat pixel range, (n, D) features) over one image (C, S, S), n <= chunk."""
        acts = self.activations(image[None])  # computed once, before the first chunk
        return dfeat.stream_from(acts, self.size, chunk)


# ============================================================================ the cache
def build_activation_cache(work: Path, activations: Callable[["Tensor"], list["Tensor"]], batches: Iterable[Any],
                           rows: Sequence[int], progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Write ``block<l>.npy`` (N, C_l, h_l, w_l) and ``rows.npy`` for the slices ``rows``.

    ``batches`` must yield SliceBatches that follow ``rows`` in order.  Each block file is
    allocated at full size when the first batch's shapes are known (one memmap per block,
    never one in-memory tensor of all slices).  Returns the metadata (shapes, bytes).
    """
    work = Path(work)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    files: list[Any] = []
    done = 0
    for b in batches:
        k = len(b)
        if not np.array_equal(np.asarray(b.index), rows[done:done + k]):
            raise RuntimeError("activation cache: batches do not follow the requested rows")
        with torch.no_grad():
            acts = activations(b.images)
        if not files:
            files = [np.lib.format.open_memmap(work / f"block{i}.npy", mode="w+", dtype=CACHE_DTYPE,
                                               shape=(n, *a.shape[1:])) for i, a in enumerate(acts)]
        for f, a in zip(files, acts):
            f[done:done + k] = a.detach().float().cpu().numpy()
        done += k
        if progress is not None:
            progress(k)
    if done != n:
        raise RuntimeError(f"activation cache: wrote {done} of {n} rows")
    shapes = [list(f.shape[1:]) for f in files]
    nbytes = int(sum(f.nbytes for f in files))
    for f in files:
        f.flush()
    del files
    np.save(work / "rows.npy", rows)
    return {"rows": int(n), "blocks": len(shapes), "shapes": shapes, "dtype": CACHE_DTYPE, "bytes": nbytes,
            "bytes_per_slice": nbytes // max(1, n)}


class CachedActivations:
    """The activations of a cache directory, read per slice row; gather / stream as the backbone's."""

    def __init__(self, path: Path, size: int, device: Any = "cpu", key: str = "") -> None:
        path, self.key = Path(path), key
        rows = np.load(path / "rows.npy")
        self.pos = {int(r): i for i, r in enumerate(rows)}
        n_blocks = len(list(path.glob("block*.npy")))
        self.blocks = [np.load(path / f"block{i}.npy", mmap_mode="r") for i in range(n_blocks)]
        self.size, self.device = int(size), device
        self.dim = int(sum(b.shape[1] for b in self.blocks))

    def covers(self, rows: Iterable[int]) -> bool:
        return all(int(r) in self.pos for r in rows)

    def activations(self, rows: Sequence[int]) -> list["Tensor"]:
        """[(B, C_l, h_l, w_l)] float32 tensors of the given slice rows, in that order."""
        pos = np.asarray([self.pos[int(r)] for r in rows], dtype=np.int64)
        order = np.argsort(pos, kind="stable")  # memmap reads in ascending order
        out = []
        for blk in self.blocks:
            arr = np.empty((len(pos), *blk.shape[1:]), dtype=np.float32)
            arr[order] = blk[pos[order]]
            out.append(torch.from_numpy(arr).to(self.device))
        return out

    def gather(self, rows: Sequence[int], coords: "Tensor") -> "Tensor":
        """(N, D) features at ``coords`` (N, 3) = (index into ``rows``, row, column)."""
        return dfeat.gather_from(self.activations(rows), coords, self.size)

    def stream(self, row: int, chunk: int = dfeat.DEFAULT_CHUNK) -> Iterator[tuple[slice, "Tensor"]]:
        """(flat pixel range, (n, D) features) over one cached slice, n <= chunk."""
        return dfeat.stream_from(self.activations([row]), self.size, chunk)


__all__ = ["ActivationBackbone", "build_activation_cache", "CachedActivations", "CACHE_DTYPE"]
