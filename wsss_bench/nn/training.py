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

from rich.markup import escape

from wsss_bench.cache import atomic_path, atomic_write_json
from wsss_bench.lazy import np, torch
from wsss_bench.progress import say

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


# ============================================================================ the convergence rule
STOP_CONVERGED = "converged"
STOP_CAP_IMPROVING = "cap while improving"
STOP_CAP_PLATEAU = "cap on a plateau"
STOP_NO_SCORE = "cap, criterion undefined"


class Criterion:
    """A trained model's validation criterion: what it is called and how to compute it.

    ``evaluate(model)`` returns ``(value, tie)``: ``value`` is the criterion (None where it
    is undefined, e.g. an AUC on one class); ``tie`` (lower is better, optional) breaks ties
    of a higher-is-better value (the classifiers' validation loss).  ``higher_is_better``
    is True for AUC and Dice, False for losses.
    """

    def __init__(self, name: str, evaluate: Callable[[Any], "tuple[float | None, float | None]"],
                 higher_is_better: bool = True) -> None:
        self.name, self.evaluate, self.higher_is_better = str(name), evaluate, bool(higher_is_better)


class ConvergenceRule:
    """Evaluate every ``every`` steps; stop after ``patience`` evaluations without improvement.

    An evaluation improves on the best so far when its value is better by more than ``delta``
    (absolute for a higher-is-better criterion such as AUC or Dice; relative to the best for a
    loss), or, for a higher-is-better criterion with a tie-break, when the value is at least
    the best and the tie-break is lower by more than ``delta_tie`` (relative).  The step cap
    is the loop's ``iterations``.
    """

    def __init__(self, every: int, patience: int, delta: float, delta_tie: float = 0.0) -> None:
        if int(every) < 1 or int(patience) < 1 or float(delta) < 0 or float(delta_tie) < 0:
            raise ValueError(f"convergence rule: every {every}, patience {patience}, delta {delta} "
                             f"must be >= 1, >= 1, >= 0")
        self.every, self.patience = int(every), int(patience)
        self.delta, self.delta_tie = float(delta), float(delta_tie)

    def improves(self, value: float | None, tie: float | None, best: "tuple[float, float | None] | None",
                 higher_is_better: bool) -> bool:
        """Whether (value, tie) improves on ``best`` = (value, tie) by more than the deltas."""
        if value is None:
            return False
        if best is None:
            return True
        b, btie = best
        if not higher_is_better:
            return value < b - self.delta * abs(b)
        if value > b + self.delta:
            return True
        return tie is not None and btie is not None and value >= b and tie < btie - self.delta_tie * abs(btie)

    def as_dict(self) -> dict[str, Any]:
        return {"every": self.every, "patience": self.patience, "delta": self.delta, "delta_tie": self.delta_tie}


def rule_from_profile(profile: Any, section: Any, kind: str, default_every: int) -> ConvergenceRule:
    """The profile's rule for one model: k = ``section.eval_every`` (``default_every`` when the
    section has none, e.g. hand-made test profiles), patience and deltas from the profile's
    ``convergence`` table (``kind`` "score": delta_score with delta_loss as the tie-break's;
    "loss": delta_loss)."""
    conv = dict(profile.get("convergence") or {}) if hasattr(profile, "get") else {}
    every = int(dict(section).get("eval_every") or default_every)
    patience = int(conv.get("patience", 5))
    d_score, d_loss = float(conv.get("delta_score", 0.002)), float(conv.get("delta_loss", 0.01))
    if kind == "score":
        return ConvergenceRule(every, patience, d_score, d_loss)
    if kind == "loss":
        return ConvergenceRule(every, patience, d_loss)
    raise ValueError(f"criterion kind {kind!r}: use 'score' or 'loss'")


def rule_params(profile: Any, section: Any) -> dict[str, Any]:
    """The profile values that change a model's weights through the rule (for cache keys)."""
    conv = dict(profile.get("convergence") or {}) if hasattr(profile, "get") else {}
    return {"convergence": conv, "eval_every": dict(section).get("eval_every")}


def auc_and_loss(labels: Any, p1: Any) -> "tuple[float | None, float | None]":
    """(ROC AUC of ``p1``, mean binary cross-entropy -log p(label)); AUC None on one class.

    For a two-class softmax, -log p(label) is exactly the cross-entropy the classifiers train
    on; for a sigmoid it is the BCE.  Probabilities are clipped to [1e-7, 1 - 1e-7].
    """
    y = np.asarray(labels).astype(np.float64).reshape(-1)
    p = np.clip(np.asarray(p1, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    if len(y) == 0:
        return None, None
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    if len(np.unique(y)) < 2:
        return None, loss
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)), loss


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
    criterion: Criterion | None = None,
    rule: ConvergenceRule | None = None,
) -> tuple[dict[str, "Tensor"], dict[str, Any]]:
    """Run ``step(it)`` for it = start..iterations-1, checkpointing into ``work``.

    ``step`` does one optimisation step (forward, backward, ``opt.step()``) and returns the
    loss; ``sched`` (optional) is stepped after each step.  Without a ``criterion`` the loop
    runs ``iterations`` steps and keeps the last weights (the EMA weights when
    ``ema_decay > 0``): the CDM and SimCLR.

    With a ``criterion`` and its ``rule`` (the convergence rule), ``iterations`` is the step
    cap: the model (EMA when on) is scored every ``rule.every`` steps and at the cap, the
    weights of the best evaluation are kept, and training stops as soon as ``rule.patience``
    evaluations in a row did not improve on the best ("converged"); otherwise it stops at
    the cap, "cap while improving" when the last evaluation was the best, "cap on a
    plateau" when it was not.  ``info["convergence"]`` holds the criterion, the rule, the
    curve (step, mean training loss since the previous evaluation, value, tie-break), the
    kept step and the stop reason; :func:`convergence_of` reads it back from a stored model.

    If ``work`` holds a checkpoint of an interrupted build of the same artifact, everything is
    restored and training continues from there; on CPU the result is bit-identical to an
    uninterrupted run.  Returns (weights on CPU, info).
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    iterations = int(iterations)
    if criterion is not None and rule is None:
        raise ValueError("run_resumable: a criterion needs its convergence rule")
    every = int(every or checkpoint_every(iterations))
    if criterion is not None:
        every = min(every, rule.every)  # a checkpoint after each evaluation keeps resume exact
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay > 0 else None
    start, log, resumed_from = 0, [], None
    curve: list[list[Any]] = []
    best: dict[str, Any] = {"value": None, "tie": None, "step": None, "weights": None}
    since, stopped, eval_sum = 0, None, [0.0, 0]
    state = load_state(work)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if sched is not None and state.get("sched") is not None:
            sched.load_state_dict(state["sched"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start, log, resumed_from = int(state["iteration"]), list(state["log"]), int(state["iteration"])
        curve = list(state.get("curve", []))
        since, stopped = int(state.get("since", 0)), state.get("stopped")
        eval_sum = list(state.get("eval_sum", [0.0, 0]))
        if state.get("best_weights") is not None:
            best = {"value": state["best_value"], "tie": state["best_tie"], "step": state["best_step"],
                    "weights": state["best_weights"]}
    t0 = time.perf_counter()
    window: list[float] = []
    if progress is not None and start:
        progress(start)

    def score_now(done: int) -> None:
        nonlocal since, stopped
        scored = ema if ema is not None else model
        was = scored.training
        scored.eval()
        with torch.no_grad():
            value, tie = criterion.evaluate(scored)
        scored.train(was)
        value = None if value is None else float(value)
        tie = None if tie is None else float(tie)
        mean_loss = eval_sum[0] / eval_sum[1] if eval_sum[1] else None
        eval_sum[:] = [0.0, 0]
        curve.append([done, mean_loss, value, tie])
        prior = None if best["value"] is None else (best["value"], best["tie"])
        if rule.improves(value, tie, prior, criterion.higher_is_better):
            best.update(value=value, tie=tie, step=done, weights=cpu_state(scored))
            since = 0
        elif value is not None:
            since += 1
        if since >= rule.patience:
            stopped = STOP_CONVERGED

    done = start
    for it in range(start, iterations):
        if stopped is not None:
            break
        model.train()
        loss = step(it)
        if sched is not None:
            sched.step()
        window.append(float(loss))
        eval_sum[0] += float(loss)
        eval_sum[1] += 1
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(ema_decay).add_(pm.detach(), alpha=1.0 - ema_decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
        done = it + 1
        if criterion is not None and (done % rule.every == 0 or done == iterations):
            score_now(done)
        if done % every == 0 or done == iterations or stopped is not None:
            log.append([done, sum(window) / len(window)])
            window = []
            save_state(work, {
                "model": model.state_dict(), "opt": opt.state_dict(), "iteration": done, "log": log,
                "sched": sched.state_dict() if sched is not None else None,
                "curve": curve, "since": since, "stopped": stopped, "eval_sum": list(eval_sum),
                "best_value": best["value"], "best_tie": best["tie"], "best_step": best["step"],
                "best_weights": best["weights"],
                **({"ema": ema.state_dict()} if ema is not None else {}),
            })
        if progress is not None:
            progress(1)
    steps = int(log[-1][0]) if log else start
    keep = ema if ema is not None else model
    convergence = None
    if criterion is not None:
        if stopped is None:
            if best["step"] is None:
                stopped = STOP_NO_SCORE
            else:
                stopped = STOP_CAP_IMPROVING if best["step"] == curve[-1][0] else STOP_CAP_PLATEAU
        convergence = {"criterion": criterion.name, "higher_is_better": criterion.higher_is_better,
                       **rule.as_dict(), "cap": iterations, "steps": steps, "stop_reason": stopped,
                       "kept_step": best["step"], "best": best["value"], "best_tie": best["tie"],
                       "curve": curve, "curve_columns": ["step", "train_loss", "value", "tie"]}
        best_txt = "no score" if best["value"] is None else f"{best['value']:.4g}"
        say(escape(f"  stopped: {stopped} after {steps} of {iterations} steps; kept step {best['step']} "
                   f"({criterion.name}: {best_txt})"))
    if best["weights"] is not None:
        weights, kept = best["weights"], f"best score at iteration {best['step']}"
    else:
        weights = cpu_state(keep)
        kept = "last" if criterion is None else "last (no evaluation gave a score)"
    info = {"iterations": steps, "cap": iterations, "resumed_from": resumed_from, "loss_log": log,
            "final_loss": log[-1][1] if log else None, "seconds_this_attempt": round(time.perf_counter() - t0, 2),
            "ema": float(ema_decay), "weights": "ema" if ema is not None else "raw", "checkpoint_every": every,
            "kept": kept, "convergence": convergence}
    return weights, info


def convergence_of(path: "Path | str") -> dict[str, dict[str, Any]]:
    """The convergence records of trained models: ``{model name: record}``.

    ``path`` is a shared model's artifact folder (every ``<name>.train.json`` in it is read)
    or one such file.  A record holds ``criterion``, ``stop_reason`` (converged / cap while
    improving / cap on a plateau), ``kept_step``, ``steps``, ``cap``, the rule (``every``,
    ``patience``, ``delta``) and the ``curve``; models trained without a criterion (the
    CDM) are left out.  Plain JSON is read; nothing is unpickled.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.train.json"))
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        info = json.loads(f.read_text())
        found = _find_convergence(info)
        for sub, rec in found:
            name = f.name[: -len(".train.json")] if f.name.endswith(".train.json") else f.stem
            out[name if not sub else f"{name}/{sub}"] = rec
    return out


def _find_convergence(info: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(info, dict):
        return []
    if isinstance(info.get("convergence"), dict):
        return [("", info["convergence"])]
    return [(k, v["convergence"]) for k, v in info.items()
            if isinstance(v, dict) and isinstance(v.get("convergence"), dict)]


__all__ = ["IterationBatches", "iteration_generator", "random_flips", "run_resumable", "checkpoint_every",
           "save_state", "load_state", "clear_checkpoint", "mix", "cpu_state", "Criterion", "ConvergenceRule",
           "rule_from_profile", "rule_params", "auc_and_loss", "convergence_of", "STOP_CONVERGED",
           "STOP_CAP_IMPROVING", "STOP_CAP_PLATEAU"]
