"""GPU figures, where a CUDA GPU exists: ResNet-50 on synthetic ImageNet-sized batches.

- precisions: images/s in fp32, TF32, bf16 and fp16 autocast (fp16 with loss scaling),
  channels_last (bf16) and torch.compile (bf16, channels_last), each as a ratio to fp32.
  Published anchor: AMP ≈ 2.6× TF32 on an A100.
- trainlab's Runner against a bare loop on the same model, data and precision, in this one
  process (alternating).
- DDP scaling: images/s per GPU with N GPUs against one (torchrun-free: spawned NCCL ranks).
  Published anchor: 84–96 % at 8 GPUs.
Without a GPU every section says so and is skipped.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

BATCH = 64
SIZE = 224
STEPS = 30
WARMUP = 10


def _model(channels_last: bool = False, compiled: bool = False) -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(num_classes=1000).cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compiled else model


def _batch(channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, 3, SIZE, SIZE, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (BATCH,), device="cuda")


def bare_loop(model: nn.Module, dtype: torch.dtype | None, channels_last: bool = False,
              steps: int = STEPS) -> float:
    """images/s of a plain training loop (autocast + GradScaler for fp16)."""
    x, y = _batch(channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            torch.cuda.synchronize()
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    return steps * BATCH / (time.perf_counter() - started)


def precisions() -> list[tuple[str, float]]:
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows.append(("fp32", bare_loop(_model(), None)))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows.append(("TF32", bare_loop(_model(), None)))
    rows.append(("bf16 autocast", bare_loop(_model(), torch.bfloat16)))
    rows.append(("fp16 autocast + GradScaler", bare_loop(_model(), torch.float16)))
    rows.append(("bf16 + channels_last", bare_loop(_model(True), torch.bfloat16, True)))
    rows.append(("bf16 + channels_last + torch.compile",
                 bare_loop(_model(True, True), torch.bfloat16, True)))
    return rows


def trainlab_against_bare(rounds: int = 3) -> tuple[float, float]:
    """(bare images/s, trainlab images/s) in bf16, alternating round by round."""
    from trainlab.data.loaders import InMemoryLoader
    from trainlab.metrics import TaskMetrics
    from trainlab.precision import Precision
    from trainlab.runner import Runner
    from trainlab.tracker import NullTracker

    x, y = _batch()
    loader = InMemoryLoader((x.repeat(STEPS // 2, 1, 1, 1), y.repeat(STEPS // 2)), BATCH,
                            shuffle=True, device="cuda")
    bare, ours = [], []
    for _ in range(rounds):
        bare.append(bare_loop(_model(), torch.bfloat16))
        model = _model()
        runner = Runner(
            model=model, loss=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            train_loader=loader, val_loader=loader, tracker=NullTracker(),
            checkpoint_dir=os.devnull, precision=Precision("bf16"),
            metrics=TaskMetrics("classification", 1000), device=torch.device("cuda"),
            progress_bar=False,
        )
        runner.train_epoch(0)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        runner.train_epoch(1)
        torch.cuda.synchronize()
        ours.append(len(loader) * BATCH / (time.perf_counter() - started))
    return statistics.median(bare), statistics.median(ours)


def _ddp_rank(rank: int, world: int, results) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    model = nn.parallel.DistributedDataParallel(_model(True), device_ids=[rank])
    speed = bare_loop(model, torch.bfloat16, channels_last=True)
    if rank == 0:
        results.put(speed)
    dist.destroy_process_group()


def ddp_scaling() -> list[tuple[int, float]]:
    """(GPUs, images/s per GPU) for 1, 2, 4, … up to every visible GPU."""
    import torch.multiprocessing as mp

    rows = []
    world = 1
    while world <= torch.cuda.device_count():
        context = mp.get_context("spawn")
        results = context.Queue()
        mp.start_processes(_ddp_rank, args=(world, results), nprocs=world, start_method="spawn")
        rows.append((world, results.get()))
        world *= 2
    return rows


def gpu_figures() -> str:
    if not torch.cuda.is_available():
        return ("### GPU\n\nNo CUDA GPU on this machine: the ResNet-50 precision, "
                "trainlab-vs-bare-loop and DDP scaling figures are skipped.\n")
    name = torch.cuda.get_device_name()
    rows = precisions()
    fp32 = rows[0][1]
    lines = [f"### ResNet-50, synthetic {BATCH}×3×{SIZE}×{SIZE} batches, SGD, on {name}\n",
             "| precision | images/s | ratio to fp32 |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {speed:,.0f} | {speed / fp32:.2f}× |" for label, speed in rows]
    tf32 = dict(rows)["TF32"]
    amp = dict(rows)["bf16 autocast"]
    lines.append(f"\nbf16 AMP / TF32: {amp / tf32:.2f}× (published A100 anchor ≈ 2.6×).\n")
    bare, ours = trainlab_against_bare()
    lines += ["| loop, bf16 | images/s |", "| --- | ---: |", f"| bare loop | {bare:,.0f} |",
              f"| trainlab Runner | {ours:,.0f} |", f"\ntrainlab / bare: {ours / bare:.2f}×\n"]
    scaling = ddp_scaling()
    one = scaling[0][1]
    lines += ["| GPUs (DDP, bf16, channels_last) | images/s per GPU | scaling efficiency |",
              "| ---: | ---: | ---: |"]
    lines += [f"| {n} | {speed:,.0f} | {speed / one:.0%} |" for n, speed in scaling]
    lines.append("\nPublished anchor: 84–96 % at 8 GPUs.")
    return "\n".join(lines) + "\n"
