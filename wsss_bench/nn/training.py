"""The one resumable training loop every shared model uses.

The CAM classifier, the CDM, the noisy classifier, SEAM, AME-CAM, DiG, FSL, the Table 2
classifiers and the CLDF decoder all train through :func:`run_resumable`:

- ``step(it)`` does one optimisation step and returns its loss; the loop owns checkpoints,
  the learning-rate scheduler, EMA, validation-based selection and progress;
- every ``every`` iterations the model, optimiser, scheduler, EMA and the selection state
  are written to ``work/checkpoint.safetensors`` (tensors) and ``work/checkpoint.json``
  (everything else), atomically: no pickle, so resuming never unpickles anything;
- a build killed mid-way restarts from its last checkpoint, and because batches
  (:class:`IterationBatches`) and per-iteration randomness (:func:`iteration_generator`)
  are pure functions of (seed, iteration), the resumed run ends bit-identical (CPU) to an
  uninterrupted one.

Importing this module does not import torch.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from wsss_bench.cache import atomic_path, atomic_write_json
from wsss_bench.lazy import np, torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    Tensor = _torch.Tensor

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"


# ============================================================================ batches and randomness
def mix(seed: int, *parts: int) -> int:
    """A deterministic sub-seed of ``seed`` for ``parts`` (epoch, iteration, ...)."""
    h = int(seed) % (2**63)
    for p in parts:
        h = (h * 6364136223846793005 + 1442695040888963407 + int(p)) % (2**63)
    return h


class IterationBatches:
    """Training batch of iteration ``it``: epoch-wise reshuffled, restartable at any iteration.

    The order of epoch e is a permutation drawn from a generator seeded with (seed, e), so a
    run resumed at iteration k sees exactly the batches an uninterrupted run would.  An epoch
    has ``len(idx) // batch`` full batches (a last partial batch is dropped), or one batch
    of everything when there are fewer slices than ``batch``; with ``drop_last=False`` the
    last partial batch is kept (ceil(n / batch) batches per epoch).
    """

    def __init__(self, data: Any, idx: Sequence[int], batch: int, seed: int, device: Any,
                 with_masks: bool = False, drop_last: bool = True) -> None:
        self.data, self.idx, self.batch = data, np.asarray(idx), int(batch)
        if len(self.idx) == 0:
            raise ValueError("training split is empty: nothing to train on")
        self.seed, self.device, self.with_masks = seed, str(device), with_masks
        self.drop_last = drop_last
        n = len(self.idx)
        self.per_epoch = max(1, n // self.batch) if drop_last else max(1, -(-n // self.batch))
        self._pos: tuple[int, int] | None = None
        self._iter: Iterable | None = None

    def epochs(self, n: int) -> int:
        """Iterations of ``n`` epochs."""
        return int(n) * self.per_epoch

    def order(self, epoch: int):
        g = torch.Generator().manual_seed(mix(self.seed, 1, epoch))
        perm = torch.randperm(len(self.idx), generator=g).numpy()
        if not self.drop_last or len(self.idx) < self.batch:
            return self.idx[perm]
        return self.idx[perm][: self.per_epoch * self.batch]

    def get(self, it: int):
        epoch, k = divmod(int(it), self.per_epoch)
        if self._pos != (epoch, k):
            rest = self.order(epoch)[k * self.batch:]
            kwargs = {"with_masks": True} if self.with_masks else {}
            self._iter = iter(self.data.batches(rest, self.batch, shuffle=False, device=self.device, **kwargs))
        batch = next(self._iter)
        self._pos = (epoch, k + 1)
        return batch


def iteration_generator(seed: int, it: int) -> "_torch.Generator":
    """The CPU generator for iteration ``it``'s random choices (resume-exact)."""
    return torch.Generator().manual_seed(mix(seed, 2, it))


def random_flips(x: "Tensor", g: "_torch.Generator") -> "Tensor":
    """Flip each image left-right with probability 1/2 (BraTS only, docs/methods/conventions.md)."""
    flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def checkpoint_every(iterations: int) -> int:
    """Checkpoint interval: 20 checkpoints per run, between every 50 and every 1000 iterations."""
    return int(min(1000, max(50, iterations // 20)))


# ============================================================================ safe checkpoints
def _flatten(prefix: str, obj: Any, tensors: dict[str, "Tensor"]) -> Any:
    """Move every tensor of a nested state into ``tensors``; return the JSON-able rest."""
    if torch.is_tensor(obj):
        name = f"t{len(tensors)}"  # unique whatever the keys look like
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(f"{prefix}.{k}", v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": repr(obj)}
    return obj


def _key(k: Any) -> Any:
    return {"__int__": k} if isinstance(k, int) else k


def _unkey(k: Any) -> Any:
    return k["__int__"] if isinstance(k, dict) else k


def _unflatten(obj: Any, tensors: dict[str, "Tensor"]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unkey(k): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def save_state(work: Path, state: dict[str, Any]) -> None:
    """Write a nested state (state dicts, counters, logs) as safetensors + JSON, atomically.

    The JSON names the tensor file's content hash, so a kill between the two writes is seen
    on load (the pair does not match) and the older checkpoint is not mixed with the newer.
    """
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    rest = _flatten("s", state, tensors)
    with atomic_path(Path(work) / CHECKPOINT) as tmp:
        save_file(tensors, str(tmp))
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
    atomic_write_json(Path(work) / CHECKPOINT_META, {"state": rest, "tensors_sha256": digest})


def load_state(work: Path) -> dict[str, Any] | None:
    """The last complete checkpoint in ``work``, or None."""
    from safetensors.torch import load_file

    tpath, mpath = Path(work) / CHECKPOINT, Path(work) / CHECKPOINT_META
    if not (tpath.is_file() and mpath.is_file()):
        return None
    meta = json.loads(mpath.read_text())
    if hashlib.sha256(tpath.read_bytes()).hexdigest() != meta.get("tensors_sha256"):
        return None  # killed between the two writes: start over rather than mix checkpoints
    return _unflatten(meta["state"], load_file(str(tpath)))


def clear_checkpoint(work: Path) -> None:
    for name in (CHECKPOINT, CHECKPOINT_META):
        (Path(work) / name).unlink(missing_ok=True)


# ============================================================================ the loop
def cpu_state(model) -> dict[str, "Tensor"]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def run_resumable(
    work: Path,
    model,
    opt,
    iterations: int,
    step: Callable[[int], float],
    ema_decay: float = 0.0,
    progress: Callable[[int], Any] | None = None,
    every: int | None = None,
    sched=None,
    evaluate: Callable[[Any], "float | None"] | None = None,
    eval_every: int | None = None,
) -> tuple[dict[str, "Tensor"], dict[str, Any]]:
    """Run ``step(it)`` for it = start..iterations-1, checkpointing into ``work``.

    ``step`` does one optimisation step (forward, backward, ``opt.step()``) and returns the
    loss; ``sched`` (optional) is stepped after each step.  With ``evaluate`` the model is
    scored every ``eval_every`` iterations (and at the end) and the weights of the best
    score are kept (the first on ties; a None score never wins); without it the last
    weights are kept (the EMA weights when ``ema_decay > 0``).

    If ``work`` holds a checkpoint of an interrupted build of the same artifact, everything is
    restored and training continues from there; on CPU the result is bit-identical to an
    uninterrupted run.  Returns (weights on CPU, info).
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    iterations = int(iterations)
    every = int(every or checkpoint_every(iterations))
    if evaluate is not None and eval_every:
        every = min(every, int(eval_every))  # a checkpoint after each evaluation keeps resume exact
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay > 0 else None
    start, log, resumed_from = 0, [], None
    scores: list[list[Any]] = []
    best: dict[str, Any] = {"score": None, "iteration": None, "weights": None}
    state = load_state(work)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if sched is not None and state.get("sched") is not None:
            sched.load_state_dict(state["sched"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start, log, resumed_from = int(state["iteration"]), list(state["log"]), int(state["iteration"])
        scores = list(state.get("scores", []))
        if state.get("best_weights") is not None:
            best = {"score": state["best_score"], "iteration": state["best_iteration"],
                    "weights": state["best_weights"]}
    t0 = time.perf_counter()
    window: list[float] = []
    if progress is not None and start:
        progress(start)

    def score_now(it: int) -> None:
        value = evaluate(ema if ema is not None else model)
        scores.append([it, value])
        if value is not None and (best["score"] is None or value > best["score"]):
            best.update(score=float(value), iteration=it, weights=cpu_state(ema if ema is not None else model))

    for it in range(start, iterations):
        model.train()
        loss = step(it)
        if sched is not None:
            sched.step()
        window.append(float(loss))
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(ema_decay).add_(pm.detach(), alpha=1.0 - ema_decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
        done = it + 1
        if evaluate is not None and eval_every and (done % int(eval_every) == 0 or done == iterations):
            score_now(done)
        if done % every == 0 or done == iterations:
            log.append([done, sum(window) / len(window)])
            window = []
            save_state(work, {
                "model": model.state_dict(), "opt": opt.state_dict(), "iteration": done, "log": log,
                "sched": sched.state_dict() if sched is not None else None,
                "scores": scores, "best_score": best["score"], "best_iteration": best["iteration"],
                "best_weights": best["weights"],
                **({"ema": ema.state_dict()} if ema is not None else {}),
            })
        if progress is not None:
            progress(1)
    if evaluate is not None and not eval_every and scores == []:
        score_now(iterations)
    keep = ema if ema is not None else model
    if best["weights"] is not None:
        weights, kept = best["weights"], f"best score at iteration {best['iteration']}"
    else:
        weights = cpu_state(keep)
        kept = "last" if evaluate is None else "last (no evaluation gave a score)"
    info = {"iterations": iterations, "resumed_from": resumed_from, "loss_log": log,
            "final_loss": log[-1][1] if log else None, "seconds_this_attempt": round(time.perf_counter() - t0, 2),
            "ema": float(ema_decay), "weights": "ema" if ema is not None else "raw", "checkpoint_every": every,
            "kept": kept, "scores": scores, "best_score": best["score"], "best_iteration": best["iteration"]}
    return weights, info


__all__ = ["IterationBatches", "iteration_generator", "random_flips", "run_resumable", "checkpoint_every",
           "save_state", "load_state", "clear_checkpoint", "mix", "cpu_state"]
