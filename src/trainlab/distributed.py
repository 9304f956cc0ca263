"""Devices and processes: which device a run uses, DDP workers the job spawns itself (or the
group an outside ``torchrun`` made), and the rank-0 / cross-rank helpers the runner needs."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainlab.errors import TrainlabError
from trainlab.signals import forwarded_to

ACCELERATORS = ("auto", "cpu", "cuda", "mps")


def select_device(accelerator: str = "auto") -> torch.device:
    """The device for ``accelerator``; a clear error when that hardware is absent."""
    if accelerator not in ACCELERATORS:
        raise TrainlabError(
            f"trainer.accelerator={accelerator!r} is not known; choose one of {ACCELERATORS}"
        )
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if accelerator == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if accelerator == "cuda" and not cuda:
        raise TrainlabError("trainer.accelerator=cuda but no CUDA GPU is visible; use cpu or auto")
    if accelerator == "mps" and not mps:
        raise TrainlabError("trainer.accelerator=mps but MPS is not available; use cpu or auto")
    return torch.device(accelerator)


def gpu_for_job(job_num: int, n_gpus: int) -> int:
    """Parallel sweep jobs spread over the GPUs: job i gets GPU ``i % n_gpus``."""
    return job_num % n_gpus


def job_device(device: torch.device) -> torch.device:
    """In a sweep, a CUDA job runs on GPU ``job.num % n_gpus`` instead of all on GPU 0."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if device.type != "cuda" or not HydraConfig.initialized():
        return device
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return device
    device = torch.device("cuda", gpu_for_job(hydra_cfg.job.num, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


@dataclass(frozen=True)
class Launch:
    """How a job runs: on which device type, with which device indices, in how many processes.

    ``external`` means an outside launcher (``torchrun``) started the processes and set
    RANK/WORLD_SIZE; the job then joins that group instead of spawning its own.
    """

    device_type: str
    device_ids: tuple[int, ...]
    world_size: int
    external: bool = False

    @property
    def spawns(self) -> bool:
        return self.world_size > 1 and not self.external

    def device(self, rank: int) -> torch.device:
        if self.device_type == "cuda":
            index = int(os.environ.get("LOCAL_RANK", 0)) if self.external else rank
            return torch.device("cuda", self.device_ids[index % len(self.device_ids)])
        return torch.device(self.device_type)


def plan_launch(accelerator: str, devices: Any = "auto") -> Launch:
    """Resolve ``trainer.accelerator`` and ``trainer.devices`` (``auto``, a count, or a list
    of GPU indices) into a :class:`Launch`."""
    device_type = select_device(accelerator).type
    if device_type == "cuda":
        available = list(range(torch.cuda.device_count()))
    else:
        available = [0] if device_type == "mps" else None  # cpu: any number of processes
    ids = _device_ids(device_type, devices, available)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Launch(device_type, ids, int(os.environ["WORLD_SIZE"]), external=True)
    return Launch(device_type, ids, len(ids))


def _device_ids(device_type: str, devices: Any, available: list[int] | None) -> tuple[int, ...]:
    if devices == "auto":
        return tuple(available) if device_type == "cuda" and available else (0,)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        if available is not None and devices > len(available):
            raise TrainlabError(
                f"trainer.devices={devices} but only {len(available)} {device_type} device(s) "
                "are visible"
            )
        return tuple(range(devices))
    if not isinstance(devices, (str, int, bool)) and device_type == "cuda":
        ids = tuple(int(i) for i in devices)
        bad = [i for i in ids if i not in available]
        if bad or not ids or len(set(ids)) != len(ids):
            raise TrainlabError(
                f"trainer.devices={list(ids)} names GPUs that are not visible or repeats one; "
                f"visible: {available}"
            )
        return ids
    raise TrainlabError(
        f"trainer.devices={devices!r} is not valid for {device_type}; use auto, a number of "
        "devices (processes on cpu), or a list of GPU indices like [0,2] with accelerator=cuda"
    )


# --------------------------------------------------------------- process group
def init_process_group(launch: Launch, rank: int) -> torch.device:
    """Join (or form) the group of ``launch``; returns this rank's device."""
    device = launch.device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launch.external:
        dist.init_process_group(backend)  # env:// from torchrun
    else:
        dist.init_process_group(backend, rank=rank, world_size=launch.world_size)
    atexit.register(leave_process_group)  # under torchrun nothing else leaves it
    return device


def leave_process_group() -> None:
    """Destroy the group while the interpreter is whole: a gloo group torn down during
    interpreter shutdown can abort the process (SIGABRT) after training went well."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def reduce_mean(values: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
    """The ``weight``-weighted mean of ``values`` over all ranks (identity in one process)."""
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64)
    dist.all_reduce(packed)
    return {k: (packed[i] / packed[-1]).item() for i, k in enumerate(keys)}


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    packed = torch.tensor([int(flag)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item())


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def ranks_in_sync(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same parameters as rank 0."""
    if not is_distributed():
        return True
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    return not any_rank(not torch.equal(flat, reference))


# ---------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_fit(
    fit: Callable[..., Any], launch: Launch, cfg: Any, output_dir: Path, choices: dict,
    run_id: str | None, resume: Path | None,
) -> tuple[float, int]:
    """Run ``fit`` (an importable function, called like ``train.fit``) in
    ``launch.world_size`` worker processes of this job.

    The MLflow run stays owned by the calling process; rank 0 logs into it. SIGINT/SIGTERM
    sent to this process are passed on to the workers, which checkpoint and stop; the call
    then raises KeyboardInterrupt. Returns rank 0's (best, best_epoch).
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import (
        ProcessException,
        ProcessExitedException,
        ProcessRaisedException,
    )

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(
        _worker, args=(fit, launch, cfg, output_dir, choices, run_id, resume, results),
        nprocs=launch.world_size, join=False, start_method="spawn",
    )
    failure: ProcessException | None = None
    with forwarded_to(context.processes) as received:
        try:
            while not context.join(grace_period=10):
                pass
        except ProcessException as err:
            failure = err  # the workers' own reports (below) say more when they could
        outcome, left = {}, set()
        while not results.empty():
            kind, *payload = results.get()
            outcome.setdefault(kind, payload)
            if kind == "left":
                left.add(payload[0])
    if received or ("interrupted" in outcome and failure is None):
        raise KeyboardInterrupt
    if failure is not None and "done" in outcome and len(left) == launch.world_size:
        # every rank finished its work and passed the final barrier: only the teardown failed
        print(f"warning: DDP worker rank {failure.error_index} failed while leaving the "
              f"process group, after the job's work was done ({failure})", file=sys.stderr)
        return tuple(outcome["done"])
    killed = _killed_worker(failure, context.processes)  # its peers' errors follow from it
    if killed:
        raise TrainlabError(killed)
    if "error" in outcome:
        raise TrainlabError(outcome["error"][0])
    if isinstance(failure, ProcessRaisedException):  # a bug: keep the worker's traceback
        raise RuntimeError(f"DDP worker rank {failure.error_index} failed:\n{failure.msg}")
    if isinstance(failure, ProcessExitedException):
        raise TrainlabError(f"DDP worker rank {failure.error_index} (pid {failure.error_pid}) "
                            f"exited with code {failure.exit_code}; the job stopped")
    if "interrupted" in outcome:
        raise KeyboardInterrupt
    if "done" not in outcome:
        raise TrainlabError("the DDP workers ended without a result")
    return tuple(outcome["done"])


def _killed_worker(failure, processes) -> str | None:
    """One line naming the worker a signal other than a stop request (SIGTERM, SIGINT)
    ended, e.g. SIGKILL from the OOM killer: the one torch saw first, else any; or None."""
    first = [failure.error_index] if hasattr(failure, "exit_code") else []
    for index in [*first, *range(len(processes))]:
        process = processes[index]
        code = process.exitcode
        if code is not None and code < 0 and -code not in (signal.SIGTERM, signal.SIGINT):
            return (f"DDP worker rank {index} (pid {process.pid}) was killed by "
                    f"{signal.Signals(-code).name}; the job stopped")
    return None


def _worker(rank_: int, fit, launch: Launch, cfg, output_dir, choices, run_id, resume, results):
    """One DDP rank: join the group, build every part, ``fit``; rank 0 logs into ``run_id``."""
    from trainlab.components import build
    from trainlab.outbox import SPOOL_DIR
    from trainlab.seeding import seed_everything
    from trainlab.tracker import NullTracker

    os.setpgrp()  # a terminal's Ctrl-C reaches the launching process only; it forwards it once
    device = init_process_group(launch, rank_)  # fit() sizes the rank's share of the cores
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    try:
        if rank_ == 0:
            tracker = build(cfg.logger, "logger", choices.get("logger"))
        else:
            tracker = NullTracker.like(cfg.logger)
        with tracker.attach(run_id, spool_dir=Path(output_dir) / SPOOL_DIR):
            result = fit(cfg, tracker, output_dir, choices, device=device, resume=resume)
        if rank_ == 0:
            results.put(("done", result.best, result.best_epoch))
        dist.barrier()  # rank 0 may still be logging; leave the group together
        results.put(("left", rank_))
    except TrainlabError as err:
        results.put(("error", str(err)))
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        results.put(("interrupted",))
        raise SystemExit(130) from None  # the launching process reports it, in one line
    finally:
        leave_process_group()
