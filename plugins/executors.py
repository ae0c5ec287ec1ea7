"""Executors: how the jobs of a run or a bench are run.

- ``local``: one after another in this process (models and data are shared between cells);
  ``local[jobs=N]``: a pool of N worker processes (spawned, so torch starts clean in each),
  each with cores / N torch threads.  ``bench`` builds every shared model in its first
  phase, so two workers never train the same model; within a phase, units that need the
  same model meet at the artifact's file lock and the second one reuses the first one's.
- ``slurm[...]``: one SLURM job per unit or cell through submitit
  (``pip install 'wsss-bench[slurm]'``), submitted as a job array per phase (the cells'
  array starts after the shared phase has finished).  Options come from the spec or from a
  YAML file (``slurm[config=cluster.yaml]``); ``cluster=local`` runs the very same code path
  through submitit's local executor (how the tests run it, and a dry run on a laptop).
  Each job returns its own outcome (status, cache events, data summary) to the parent.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from wsss_bench.errors import UserError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import Executor


class LocalExecutor(Executor):
    name = "local"
    params = {"jobs": 1}
    description = "run cells in this process, or in a pool of worker processes (jobs=N)"

    def validate(self) -> None:
        if self.p["jobs"] < 1:
            raise self.bad_param("jobs", "must be >= 1 (the number of worker processes)")

    def map(self, fn: Callable[[Any], Any], cells: Sequence[Any]) -> list[Any]:
        if self.p["jobs"] == 1 or len(cells) <= 1:
            results = []
            for cell in cells:
                try:
                    results.append(fn(cell))
                except Exception as err:  # fn normally catches; this keeps other cells going regardless
                    results.append(err)
            return results
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from wsss_bench.running.plan import worker_threads

        jobs = min(int(self.p["jobs"]), len(cells))
        threads = worker_threads(jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads, os.getpid())) as pool:
            futures = [pool.submit(fn, cell) for cell in cells]
            results = []
            for fut in futures:
                try:
                    results.append(fut.result())
                except Exception as err:
                    results.append(err)
        return results


def _worker_init(threads: int, parent: int | None = None) -> None:
    """A pool worker: ``threads`` torch threads, and it ends when its parent process ends."""
    import torch

    if parent is not None:
        _die_with(parent)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


#: how often a worker looks whether its parent is still alive (seconds)
PARENT_POLL_S = 1.0


def _die_with(parent: int) -> None:
    """End this worker within a second of process ``parent`` ending, even by SIGKILL (which runs
    no clean-up in the parent): a daemon thread exits when this process was re-parented.
    (Not PR_SET_PDEATHSIG: it fires when the *thread* that started the worker ends, which in a
    pool need not be the main one.)  Without it, killing only the parent of ``local[jobs=N]``
    left N workers running for minutes."""
    import threading
    import time

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(PARENT_POLL_S)

    if os.getppid() != parent:  # the parent died before we got here
        os._exit(1)
    threading.Thread(target=watch, name="wsss-parent-watch", daemon=True).start()


class SlurmExecutor(Executor):
    name = "slurm"
    description = "one SLURM job per unit/cell via submitit job arrays (extra: slurm)"
    params = {"partition": "", "gpus": 1, "cpus": 8, "mem_gb": 32, "timeout_min": 1440,
              "folder": "slurm-logs", "account": "", "parallelism": 64, "config": "", "cluster": "slurm"}

    def validate(self) -> None:
        if self.p["cluster"] not in ("slurm", "local", "auto"):
            raise self.bad_param("cluster", "is not one of slurm, local (submitit's local executor), auto")

    def preflight(self) -> None:
        """Refuse, before a run writes anything, an executor that cannot run on this machine:
        SLURM asked for where there is none, or submitit not installed (called by the CLI when
        it makes the executor; constructing one, as the contract suite does, checks nothing)."""
        cluster = self.options()["cluster"]
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise UserError("executor 'slurm': this machine has no SLURM (sbatch is not on PATH); run on a "
                            "cluster node, or use --executor 'local[jobs=N]' here "
                            "('slurm[cluster=local]' tries the SLURM path without a cluster)")
        if importlib.util.find_spec("submitit") is None:
            raise UserError("executor 'slurm' needs submitit: pip install 'wsss-bench[slurm]'")

    def options(self) -> dict[str, Any]:
        """The spec's options, overridden by the YAML file named by ``config`` (if any)."""
        opts = {k: v for k, v in self.p.items() if k != "config"}
        if self.p["config"]:
            path = Path(self.p["config"])
            try:
                import yaml
            except ImportError:
                raise UserError("executor 'slurm': config= needs PyYAML (pip install pyyaml)") from None
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except OSError as err:
                raise UserError(f"executor 'slurm': cannot read config file {path}: {err.strerror}") from None
            except yaml.YAMLError as err:
                raise UserError(f"executor 'slurm': config file {path} is not valid YAML: {err}") from None
            if not isinstance(data, dict):
                raise UserError(f"executor 'slurm': config file {path} must hold a mapping of options")
            unknown = sorted(set(data) - set(opts))
            if unknown:
                raise UserError(f"executor 'slurm': config file {path} has unknown option(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(opts))}")
            opts.update(data)
        return opts

    def map(self, fn: Callable[[Any], Any], cells: Sequence[Any]) -> list[Any]:
        if not cells:
            return []
        try:
            import submitit
        except ImportError:
            raise UserError("executor 'slurm' needs submitit: pip install 'wsss-bench[slurm]'") from None
        opts = self.options()
        folder = Path(opts["folder"])
        if opts["cluster"] == "local":
            executor = submitit.AutoExecutor(folder=folder, cluster="local")
            executor.update_parameters(timeout_min=int(opts["timeout_min"]))
        else:
            executor = submitit.AutoExecutor(folder=folder, cluster=None if opts["cluster"] == "auto" else "slurm")
            extra = {"slurm_partition": opts["partition"]} if opts["partition"] else {}
            if opts["account"]:
                extra["slurm_account"] = opts["account"]
            executor.update_parameters(gpus_per_node=int(opts["gpus"]), cpus_per_task=int(opts["cpus"]),
                                       mem_gb=int(opts["mem_gb"]), timeout_min=int(opts["timeout_min"]),
                                       slurm_array_parallelism=int(opts["parallelism"]), **extra)
        jobs = executor.map_array(fn, list(cells))
        results = []
        for job in jobs:
            try:
                results.append(job.result())
            except Exception as err:
                results.append(err)
        return results


@hookimpl
def register_executors(register):
    register(LocalExecutor)
    register(SlurmExecutor)
