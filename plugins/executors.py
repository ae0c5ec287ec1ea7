"""Executors: how the cells of a run are run.

- ``local``: one after another in this process (models and data are shared between cells).
- ``slurm``: one SLURM job per cell through submitit (``pip install 'wsss-bench[slurm]'``);
  cells that share a trained model wait on the artifact lock instead of training it twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from wsss_bench.errors import UserError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import Executor


class LocalExecutor(Executor):
    name = "local"
    description = "run cells sequentially in this process"

    def map(self, fn: Callable[[Any], Any], cells: Sequence[Any]) -> list[Any]:
        results = []
        for cell in cells:
            try:
                results.append(fn(cell))
            except Exception as err:  # fn normally catches; this keeps other cells going regardless
                results.append(err)
        return results


class SlurmExecutor(Executor):
    name = "slurm"
    description = "one SLURM job per cell via submitit (extra: slurm)"
    params = {"partition": "", "gpus": 1, "cpus": 8, "mem_gb": 32, "timeout_min": 1440,
              "folder": "slurm-logs", "account": ""}

    def map(self, fn: Callable[[Any], Any], cells: Sequence[Any]) -> list[Any]:
        try:
            import submitit
        except ImportError:
            raise UserError("executor 'slurm' needs submitit: pip install 'wsss-bench[slurm]'") from None
        executor = submitit.AutoExecutor(folder=Path(self.p["folder"]))
        extra = {"slurm_partition": self.p["partition"]} if self.p["partition"] else {}
        if self.p["account"]:
            extra["slurm_account"] = self.p["account"]
        executor.update_parameters(gpus_per_node=self.p["gpus"], cpus_per_task=self.p["cpus"],
                                   mem_gb=self.p["mem_gb"], timeout_min=self.p["timeout_min"], **extra)
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
