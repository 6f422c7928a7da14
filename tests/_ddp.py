"""Run a two-process gloo test without ever hanging the suite.

A worker ``fn(rank, init_file, out_dir)`` writes ``rank<r>.done`` into ``out_dir`` once its results
are saved and every rank has passed a final barrier, then leaves with ``os._exit(0)``: gloo's
teardown (``destroy_process_group``, the interpreter's exit) has aborted or hung a worker after
its work in about one full-suite run in five, which says nothing about the code under test.
"""

import os
import time
import warnings

import torch.multiprocessing as mp


def finish(out_dir: str, rank: int) -> None:
    """The worker's last call, after its final barrier: mark it done and leave at once."""
    open(os.path.join(out_dir, f"rank{rank}.done"), "w").close()
    os._exit(0)


def run_workers(fn, out_dir, world: int, timeout: float = 300.0, grace: float = 20.0) -> None:
    """Start ``world`` workers and wait for them. A run in which every worker wrote its done file is
    judged by its results even if a worker then hangs (killed after ``grace`` s) or dies; a worker
    failing before that, or the whole run taking longer than ``timeout`` s, fails the test."""
    ctx = mp.start_processes(fn, args=(str(out_dir / "init"), str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    start, done_at = time.monotonic(), None

    def all_done():
        return all((out_dir / f"rank{r}.done").exists() for r in range(world))

    def kill_all():
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)

    while True:
        try:
            if ctx.join(timeout=0.5):
                return
        except mp.ProcessExitedException as e:
            kill_all()
            if not all_done():
                raise
            warnings.warn(f"a DDP worker exited abnormally after finishing its work: {e}")
            return
        now = time.monotonic()
        if all_done():
            done_at = done_at or now
            if now - done_at > grace:
                kill_all()
                warnings.warn("a DDP worker hung after finishing its work; killed")
                return
        if now - start > timeout:
            kill_all()
            raise TimeoutError(f"DDP workers did not finish within {timeout:.0f} s")
