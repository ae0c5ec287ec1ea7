"""Killing only the parent of a ``local[jobs=2]`` run ends its workers (within seconds), and a
pool worker whose parent is already gone exits at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CODE = "import sys; from wsss_bench.cli import main; main(sys.argv[1:])"


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_end_when_the_parent_is_killed(tmp_path):
    env = dict(os.environ, WSSS_BENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", CI="1",
               PYTHONUNBUFFERED="1")
    args = ["run", "--profile", "smoke", "--cam", "gradcam", "--method", "threshold", "--task",
            "brats,flare21-kidney", "--executor", "local[jobs=2]", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-c", CODE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    guard = threading.Timer(240, proc.kill)
    guard.start()
    workers: list[int] = []
    try:
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None:  # wait until both workers compute
            workers = [k for k in _children(proc.pid) if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()]
            if len(workers) >= 2 and all(Path(f"/proc/{w}/task").exists() and
                                         len(list(Path(f"/proc/{w}/task").iterdir())) > 2 for w in workers):
                break
            time.sleep(0.5)
        assert len(workers) >= 2 and proc.poll() is None, "the pool never started"
        time.sleep(2)  # the workers are inside their cells
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.5)
        assert not any(_alive(w) for w in workers), "workers outlived their parent"
    finally:
        guard.cancel()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_worker_of_a_dead_parent_exits_at_once():
    from wsss_bench_plugins import executors

    code = ("import os; from wsss_bench_plugins.executors import _die_with; "
            "_die_with(os.getppid() + 999999); print('survived')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "survived" not in result.stdout
    assert executors.PARENT_POLL_S <= 1.0
