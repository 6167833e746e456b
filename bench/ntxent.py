"""The `scaling` section's NT-Xent figure: how well the loss with gathered negatives scales over ranks.

lightly's `NTXentLoss(gather_distributed=True)` all-gathers every rank's projections, so each of N ranks
scores its B/N x 2 samples against all 2B of the global batch: 1/N of the work of one process holding the
whole batch, plus the all-gather (forward) and the gradient's reduction (backward). Measured here on
`world` CPU processes (gloo over 127.0.0.1, one torch thread each) at a fixed global batch, forward and
backward of the loss alone on random projections. `efficiency` = (one process's time / min(world, cores))
/ the time per step with `world` ranks: 1.0 is the ideal the machine's cores allow (with more ranks than
cores, ranks share cores, so N ranks can at best run min(N, cores) times faster).
"""

from __future__ import annotations

import os
import statistics
import time

import torch


def _loss_steps(rank: int, world: int, port: int, global_batches: tuple[int, ...], dim: int, repeats: int,
                temperature: float, out: dict) -> None:
    """Per global batch, `repeats` timed loss steps (after one warm-up) on this rank; rank 0 keeps the times."""
    import torch.distributed as dist
    from lightly.loss import NTXentLoss

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        criterion = NTXentLoss(temperature=temperature, gather_distributed=world > 1)
        for global_batch in global_batches:
            g = torch.Generator().manual_seed(rank)
            per = global_batch // world
            z = [torch.randn(per, dim, generator=g).requires_grad_() for _ in range(2)]
            runs = []
            for i in range(repeats + 1):  # one warm-up
                if world > 1:
                    dist.barrier()
                t0 = time.perf_counter()
                loss = criterion(z[0], z[1])
                loss.backward()
                if world > 1:
                    dist.barrier()
                if i:
                    runs.append(time.perf_counter() - t0)
            if rank == 0:
                out[global_batch] = runs
    finally:
        if world > 1:
            dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, args: tuple, queue) -> None:
    out: dict = {}
    _loss_steps(rank, world, port, *args, out)
    if rank == 0:
        queue.put(out)


def gathered_ntxent(worlds: tuple[int, ...], global_batches: tuple[int, ...], dim: int = 128, repeats: int = 5,
                    temperature: float = 0.1) -> dict[str, dict]:
    """Per global batch (keyed by its str) and world size: seconds per loss step (forward + backward) and the
    efficiency against one process. One group of processes per world size measures every batch in turn, so
    the processes (each importing torch and lightly) start once per world size, not once per batch."""
    import torch.multiprocessing as mp

    from runtime.launch import free_port

    args = (tuple(global_batches), dim, repeats, temperature)
    before = torch.get_num_threads()
    one: dict = {}
    try:
        _loss_steps(0, 1, 0, *args, one)
    finally:
        torch.set_num_threads(before)
    cores = os.cpu_count() or 1
    results = {str(gb): {"global_batch": gb, "dim": dim, "threads_per_rank": 1, "cores": cores,
                         "world_1_step_s": statistics.median(one[gb]), "world_1_runs_s": one[gb]}
               for gb in global_batches}
    ctx = mp.get_context("spawn")
    for world in worlds:
        queue = ctx.SimpleQueue()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        if any(p.exitcode != 0 for p in procs) or queue.empty():
            for p in procs:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"the gathered NT-Xent measurement at {world} ranks failed "
                               f"(exit codes {[p.exitcode for p in procs]})")
        timed = queue.get()
        for gb in global_batches:
            result, runs = results[str(gb)], timed[gb]
            t1, tn = result["world_1_step_s"], statistics.median(runs)
            result[f"world_{world}_step_s"] = tn
            result[f"world_{world}_runs_s"] = runs
            result[f"world_{world}_speedup"] = t1 / tn
            result[f"world_{world}_efficiency"] = (t1 / min(world, cores)) / tn
    return results
