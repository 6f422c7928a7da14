"""Run a multi-process gloo test without ever hanging the suite.

A test gives a module-level ``body(rank, out_dir)``; every worker runs it inside a gloo process
group (one torch thread), passes a final barrier, writes ``rank<r>.done`` into ``out_dir`` and
leaves with ``os._exit(0)``: gloo's teardown (``destroy_process_group``, the interpreter's exit)
has aborted or hung a worker after its work in about one full-suite run in five, which says
nothing about the code under test.
"""

import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, body, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, out_dir)
        dist.barrier()  # no rank leaves while another still talks to it
    except BaseException:
        dist.destroy_process_group()
        raise
    open(os.path.join(out_dir, f"rank{rank}.done"), "w").close()
    os._exit(0)


def run_workers(body, out_dir, world: int, timeout: float = 300.0, grace: float = 20.0) -> None:
    """Run ``body(rank, out_dir)`` on ``world`` gloo ranks and wait for them (skips the test where
    torch.distributed is missing). A run in which every worker wrote its done file is judged by
    its results even if a worker then hangs (killed after ``grace`` s) or dies; a worker failing
    before that, or the whole run taking longer than ``timeout`` s, fails the test."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    ctx = mp.start_processes(_worker, args=(body, world, str(out_dir / "init"), str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
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
