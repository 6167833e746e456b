"""The Ray Train launcher shared by pretraining and fine-tuning, and the local mode that mimics it.

`run_training(loop_fn, loop_config, cfg, local, name)` runs one per-worker function either
- under Ray Train: `TorchTrainer` with the config's ScalingConfig/RunConfig/CheckpointConfig/FailureConfig,
  gloo on CPU and NCCL on GPU; or
- in this process (`local=True` or `trainer.num_workers == 0`): rank 0 of a world of 1, on the GPU if there is
  one, with a progress bar, so pdb works.
`run_tasks(loop_fn, loop_configs, cfg, name)` runs many independent local-mode runs at once as Ray tasks.
The function talks to either through `session()`: rank, world size, device, `get_checkpoint()`,
`report(metrics, checkpoint_dir=...)` and `progress(...)`. Checkpoints land in the same layout either way:
`<storage_path>/<name>/checkpoint_epoch_NNNNNN/`.

Over 400 lines on purpose: one job, the two ways of running a loop (Ray Train or Ray tasks, and in-process)
kept side by side so that they stay alike; the console display is runtime/console.py.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from runtime import checkpoint as ckpt
from runtime import console
from runtime.config import umask_mode
from runtime.environ import environ
from runtime.errors import UserError, one_line

# ------------------------------------------------------------------ sessions


class LocalSession:
    """Rank 0 of 1 in this process; persists reported checkpoints like Ray Train does (atomically)."""

    rank = 0
    local_rank = 0
    world_size = 1
    distributed = False

    def __init__(self, run_path: str, num_to_keep: int | None,
                 on_report: Callable[[dict[str, Any]], None] | None = None):
        self.run_path = run_path
        self.num_to_keep = num_to_keep
        self.on_report = on_report  # the driver's progress display follows the reports
        self._latest: str | None = None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def get_checkpoint(self) -> str | None:
        # Ray semantics: only checkpoints reported in this run (restarts); --resume arrives via loop_config
        return self._latest

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        if checkpoint_dir is not None:
            self._persist(checkpoint_dir, dir_name)
        if self.on_report is not None:
            self.on_report(dict(metrics))

    def _persist(self, checkpoint_dir: str, dir_name: str | None) -> None:
        final = Path(self.run_path) / (dir_name or Path(checkpoint_dir).name)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=_mkdir(self.run_path)))
        os.chmod(tmp, umask_mode(directory=True))  # it becomes the checkpoint dir: not mkdtemp's 0700
        try:
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # the rename is the commit: a crash before it leaves the old ones intact
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._latest = str(final)
        self._prune()

    def _prune(self) -> None:
        if not self.num_to_keep:
            return
        dirs = sorted(p for p in Path(self.run_path).iterdir() if p.is_dir() and p.name.startswith(ckpt.PREFIX))
        for old in dirs[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        from tqdm.auto import tqdm

        if self.on_report is not None and not console.verbose():
            return iterable  # the stage's one display (epochs) is on; a step bar would fight it for the line
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # None: off without a tty

    def barrier(self) -> None:
        pass

    def log(self, message: str) -> None:
        console.emit(message)


class RaySession:
    """A Ray Train worker: thin adapter over `ray.train`."""

    distributed = True

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.local_rank = ctx.get_local_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        console.quiet_ray_worker()

    def get_checkpoint(self) -> str | None:
        import ray.train

        c = ray.train.get_checkpoint()
        return None if c is None else _checkpoint_uri(c)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        # every rank must call report (it is a barrier); only rank 0 passes a checkpoint
        import ray.train

        c = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=c, checkpoint_dir_name=dir_name)

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        return iterable  # worker logs go to the driver line by line; a bar would only add noise

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def log(self, message: str) -> None:
        # straight to the worker's stdout (streamed to the driver): Ray Train's patched print would both
        # tee it and log it, showing every line twice
        print(message, file=sys.__stdout__, flush=True)


_LOCAL: LocalSession | None = None


def session() -> LocalSession | RaySession:
    """The current training session: the local shim when `run_training` runs locally, else Ray Train's."""
    return _LOCAL if _LOCAL is not None else RaySession()


def _checkpoint_uri(c: Any) -> str:
    import pyarrow.fs as pafs

    if isinstance(c.filesystem, pafs.LocalFileSystem):
        return c.path
    return f"{c.filesystem.type_name}://{c.path}"


def _mkdir(p: str) -> str:
    Path(p).mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------ launching


def storage_path(cfg: Any) -> str:
    """Where checkpoints live: trainer.storage_path (absolute path or URI), default <output_dir>/ray."""
    sp = cfg.trainer.storage_path
    if sp is None:
        return str(Path(cfg.output_dir).resolve() / "ray")
    return sp if "://" in sp else str(Path(sp).resolve())


def run_path(cfg: Any, name: str) -> str:
    return f"{storage_path(cfg).rstrip('/')}/{name}"


def run_training(loop_fn: Callable[[dict], Any], loop_config: dict[str, Any], cfg: Any, local: bool,
                 name: str, resume_from: str | None = None,
                 on_report: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Run `loop_fn(loop_config)` locally or on Ray Train workers; return rank 0's return value.

    `loop_config` gains `run_path` (this run's checkpoint storage) and `resume_from` (a checkpoint
    to start from when Ray has none of its own, e.g. `--resume`). `on_report(metrics)` is called on the
    driver with rank 0's metrics after each `report` (under Ray: from a Train callback, through a queue).
    """
    global _LOCAL
    config = {**loop_config, "run_path": run_path(cfg, name), "resume_from": resume_from}
    if local or cfg.trainer.num_workers == 0:
        if config["run_path"].startswith("file://"):
            config["run_path"] = config["run_path"][len("file://"):]
        if "://" in config["run_path"]:
            raise UserError(f"local mode writes checkpoints to a local path, got trainer.storage_path="
                            f"{cfg.trainer.storage_path}: use a directory, or run under Ray")
        torch.set_num_threads(cfg.trainer.torch_threads or os.cpu_count() or 1)
        _LOCAL = LocalSession(config["run_path"], cfg.trainer.num_to_keep, on_report)
        try:
            return loop_fn(config)
        finally:
            _LOCAL = None
    return _run_ray(loop_fn, config, cfg, name, on_report)


_HOLD = 0  # > 0 inside `one_cluster()`: the cluster a stage starts stays up for the next


@contextlib.contextmanager
def one_cluster() -> Iterator[None]:
    """The stages run inside share one Ray cluster: the first that needs Ray starts it (or connects) as it
    would alone, the others find it up, and it is shut down (or disconnected) when the block ends. Saves
    `selfsup pipeline` a second cluster start and shutdown between pretraining and fine-tuning; a cluster that
    was up before the block is left as it was."""
    global _HOLD
    import ray

    was_up = ray.is_initialized()
    _HOLD += 1
    try:
        yield
    finally:
        _HOLD -= 1
        if not _HOLD and not was_up and ray.is_initialized():
            ray.shutdown()


def run_tasks(loop_fn: Callable[[dict], Any], loop_configs: list[dict[str, Any]], cfg: Any, name: str,
              on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run `loop_fn(c)` for every config in `loop_configs` as its own Ray task, many at once; return their
    results in order; `on_done(i, result)` is called as each one finishes. Each task is the local mode (rank 0
    of 1) on `trainer.resources_per_worker` (default one CPU, plus one GPU with `trainer.use_gpu`) and as many
    torch threads as CPUs, so Ray runs as many tasks at once as the cluster has room for. For many small
    independent runs (labeled subsets) this beats spreading each run over DDP workers: no gradient traffic, no
    idle ranks. Task failures are retried by Ray."""
    task_cfg = copy.deepcopy(cfg)
    task_cfg.trainer.num_workers = 0
    task_cfg.trainer.torch_threads = task_threads(cfg.trainer)
    return map_tasks(_task, [(loop_fn, c, task_cfg, f"{name}-{i}") for i, c in enumerate(loop_configs)], cfg,
                     name, on_done)


def map_tasks(fn: Callable[..., Any], calls: list[tuple[Any, ...]], cfg: Any, name: str,
              on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """`[fn(*args) for args in calls]`, each call a Ray task on `trainer.resources_per_worker` (see
    `worker_resources`), many at once on the cluster `init_ray(cfg)` starts or joins; results in order,
    `on_done(i, result)` as each finishes. A task's UserError is raised as it is; another failure (after Ray's
    `trainer.max_failures` retries) is one line naming the task."""
    import ray

    t = cfg.trainer
    cpus, gpus = worker_resources(t)
    custom = custom_resources(t)
    started = init_ray(cfg)
    try:
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, resources=custom or None, max_retries=t.max_failures)(fn)
        refs = [remote.remote(*args) for args in calls]
        try:
            return _gather(refs, on_done)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise UserError(f"a {name} task failed: {type(cause).__name__}: {one_line(cause)[:300]}") from None
        except ray.exceptions.WorkerCrashedError:
            raise UserError(f"a {name} task's worker process died {t.max_failures + 1} time(s) (killed, or out of "
                            "memory)") from None
    finally:
        if started and not _HOLD:
            ray.shutdown()


def task_threads(trainer: Any) -> int:
    """Torch threads in one task: `trainer.torch_threads`, else as many as the task holds CPUs."""
    return trainer.torch_threads or max(1, int(worker_resources(trainer)[0]))


def task_slots(cfg: Any) -> int:
    """How many tasks on `trainer.resources_per_worker` the cluster (up, from `init_ray`) runs at once."""
    import ray

    have = ray.cluster_resources()
    need = zip(("CPU", "GPU"), worker_resources(cfg.trainer))
    return max(1, min((int(have.get(r, 0) // n) for r, n in need if n > 0), default=1))


def _gather(refs: list[Any], on_done: Callable[[int, Any], None] | None) -> list[Any]:
    """ray.get(refs), calling on_done(i, result) in the order the tasks finish."""
    import ray

    if on_done is None:
        return ray.get(refs)
    index = {r: i for i, r in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for r in ready:
            results[index[r]] = ray.get(r)  # raises the task's error, as ray.get(refs) would
            on_done(index[r], results[index[r]])
    return results


def worker_resources(trainer: Any) -> tuple[float, float]:
    """(CPUs, GPUs) one worker or task holds: `trainer.resources_per_worker`, default 1 CPU (+ 1 GPU with
    `trainer.use_gpu`, none without)."""
    cpus = float(trainer.resources_per_worker.get("CPU", 1))
    gpus = float(trainer.resources_per_worker.get("GPU", 1)) if trainer.use_gpu else 0.0
    return cpus, gpus


def custom_resources(trainer: Any) -> dict[str, float]:
    """The custom resources (not CPU/GPU) of `trainer.resources_per_worker` that each worker or task needs,
    e.g. {"trainer_node": 1} to keep training on the nodes that offer it."""
    return {k: float(v) for k, v in trainer.resources_per_worker.items() if k not in ("CPU", "GPU")}


def _task(loop_fn: Callable[[dict], Any], config: dict[str, Any], cfg: Any, name: str) -> Any:
    return run_training(loop_fn, config, cfg, local=True, name=name)


class _Follow:
    """Ray Train reports, followed on the driver: a Train callback (on the controller) puts rank 0's metrics
    on a Ray queue, a thread here hands them to `on_report`."""

    def __init__(self, on_report: Callable[[dict[str, Any]], None]):
        import threading

        from ray.util.queue import Queue

        self.on_report = on_report
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True, name="selfsup-follow")

    def callback(self) -> Any:
        from ray.train import UserCallback

        queue = self.queue

        class _ToDriver(UserCallback):
            def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
                if metrics:
                    queue.put_nowait(dict(metrics[0]))

        return _ToDriver()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                m = self.queue.get(timeout=0.5)
            except Empty:
                if self.stop.is_set():
                    return
                continue
            except Exception:  # the queue's actor is gone (shutdown): nothing more to follow
                return
            try:
                self.on_report(m)
            except Exception:  # a display problem never stops training
                pass

    def __enter__(self) -> _Follow:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _run_ray(loop_fn: Callable[[dict], Any], config: dict[str, Any], cfg: Any, name: str,
             on_report: Callable[[dict[str, Any]], None] | None = None) -> Any:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.trainer
    started = init_ray(cfg)
    try:
        follow = _Follow(on_report) if on_report is not None else None
        trainer = TorchTrainer(
            loop_fn,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker=dict(t.resources_per_worker) or None),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path(cfg),
                checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
                failure_config=FailureConfig(max_failures=t.max_failures),
                logging_config=LoggingConfig(log_level=console.ray_train_log_level()),
                callbacks=[follow.callback()] if follow else None,
            ),
        )
        # Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s; read
        # from the driver's environment when `fit` starts the controller): a report waits up to that long to be
        # picked up, a second one within it blocks the training loop, and a run ends up to that long after its
        # last step. The driver's own value is back afterwards.
        poll = environ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(t.poll_interval_s)})
        try:
            with follow or contextlib.nullcontext(), poll, _own_sigint():
                result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise UserError(f"training failed after {t.max_failures} restart(s): {_root_cause(e)}") from None
        return result.return_value
    finally:
        if started and not _HOLD:
            ray.shutdown()


@contextlib.contextmanager
def _own_sigint() -> Iterator[None]:
    """`fit` installs Ray Train's SIGINT handler (abort the run's controller) and leaves it there: a later Ctrl-C
    (in the pipeline's next stage) would reach that handler, which asks the finished controller to abort, instead
    of the driver's, and the handler would keep that controller's actor alive. The driver's own handler is put
    back when `fit` returns."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # Train installs none off the main thread
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _root_cause(e: Exception) -> str:
    """One line for the user: the first worker's own error, not Ray's wrapper text."""
    from ray.exceptions import RayActorError

    def died(err: BaseException) -> bool:  # Train V2 reports a dead worker as a failed health check
        return isinstance(err, RayActorError) or type(err).__name__ == "WorkerHealthCheckFailedError"

    failures = getattr(e, "worker_failures", None) or {}
    # a dead worker process first: the other ranks' errors (gloo "connection reset") are its echoes
    for rank in sorted(failures, key=lambda r: (not died(failures[r]), r)):
        err = failures[rank]
        if died(err):
            return f"rank {rank}'s worker process died (killed, out of memory, or its node was lost)"
        cause = getattr(err, "cause", None) or err
        return f"rank {rank}: {type(cause).__name__}: {one_line(cause)[:300]}"
    inner = getattr(e, "controller_failure", None) or e
    return one_line(inner)[:300]


# The private local cluster's Ray system config (bench/README.md, `ray` and `daemons`, has the measurements):
# - worker_niceness 0: Ray starts its worker processes at nice 15 by default, so that any other process (its own
#   GCS, raylet and dashboard included) takes their cores first; on 2 cores that was part of the gap between a
#   Ray Train worker and the same steps in-process. On the private cluster the workers are the job: they run at
#   the driver's priority.
# - no prestarted workers: Ray starts an idle Python worker per CPU up front to take a first task quickly; no
#   task or actor of ours can use one (each carries a runtime_env, which a worker started with the default
#   env does not match), and each woke about 100 times a second beside the training step's threads.
PRIVATE_CLUSTER_CONFIG: dict[str, Any] = {
    "worker_niceness": 0, "enable_worker_prestart": False, "prestart_worker_first_driver": False}


def init_ray(cfg: Any, system_config: dict[str, Any] | None = None) -> bool:
    """Connect to the configured/ambient cluster, or start a private local one. True if we started it.

    The local cluster binds to 127.0.0.1, has token authentication on and usage stats off; the
    dashboard is on because Train V2's controller needs it. `system_config` replaces
    PRIVATE_CLUSTER_CONFIG (the bench compares the two).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.trainer.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True, **_ray_logging())
        except Exception as e:  # ConnectionError, RuntimeError, AuthenticationError, ...
            raise UserError(f"cannot connect to Ray at {address}: {one_line(e)[:200]}; "
                            "check trainer.address / RAY_ADDRESS, or unset it to start a local cluster") from None
        return False
    t = cfg.trainer
    cpus, gpus = worker_resources(t)
    num_cpus = max(1, int(round(cpus * t.num_workers)))
    # never more GPUs than this machine has: Ray would hand out device ids that do not exist
    num_gpus = min(int(round(gpus * t.num_workers)), torch.cuda.device_count() if gpus else 0)
    # Ray >= 2.5x turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset (and
    # makes a token in ~/.ray/auth_token); setting the variable ourselves would skip its config refresh.
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        print(f"warning: RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: the local Ray cluster runs without "
              "token authentication")
    # Ray resolves 127.0.0.1 to the machine's outward address unless it is in single-machine mode; this
    # switch (read by every Ray process it starts) keeps the GCS, raylet and dashboard on the loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # one private machine has no nodes to drain: Train's PreemptionWatcher actor would only log a core-worker
    # error about its restartable constructor arguments (read by the Train controller, which Train passes it to)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # A GCS port chosen here lets every process of the job know its own cluster: Ray Train's helper actors
    # look the cluster up by address and fail with "multiple active Ray instances" when others run nearby.
    gcs_port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    # custom resources the workers ask for exist on the private cluster too, or nothing could be scheduled
    resources = {k: v * max(1, t.num_workers) for k, v in custom_resources(t).items()}
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                 _system_config=PRIVATE_CLUSTER_CONFIG if system_config is None else system_config,
                 include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=free_port(), _node_ip_address="127.0.0.1",
                 log_to_driver=True, **_ray_logging(), runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}})
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    return True


def _ray_logging() -> dict[str, Any]:
    """ray.init's logging: the driver's `ray` logger and the job's workers and actors at INFO with --verbose /
    SELFSUP_VERBOSE=1, else warnings and errors only from the driver and errors only from Ray's actors."""
    import logging

    import ray

    return {"logging_level": logging.INFO if console.verbose() else logging.WARNING,
            "logging_config": ray.LoggingConfig(encoding="TEXT", log_level=console.ray_job_log_level())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_reachable(address: str) -> None:
    """Fail in seconds with one line, instead of Ray's long retry loop, when nothing listens there."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r} must look like HOST:PORT or ray://HOST:PORT; "
                        "fix trainer.address / RAY_ADDRESS")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as e:
        raise UserError(f"cannot reach Ray at {address} ({e.strerror or e}): check trainer.address / "
                        "RAY_ADDRESS, or unset it to start a local cluster") from None
