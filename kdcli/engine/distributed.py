"""DDP under torchrun: process rank/world from the environment, init and teardown, rank-0 helpers.

One process per GPU (`torchrun --nproc_per_node N -m kdcli train ...`); on CPU the gloo backend works too,
which is how the tests exercise it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kdcli.errors import KdcliError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def resolve_device(spec: str) -> torch.device:
    """`auto`, `cpu`, `0` or `0,1`: several GPUs need torchrun, one process per GPU."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    ids = [s for s in spec.replace(" ", "").split(",") if s]
    if not all(s.isdigit() for s in ids) or not ids:
        raise KdcliError(f"device '{spec}' not understood", hint="use cpu, 0, or 0,1")
    if not torch.cuda.is_available():
        raise KdcliError(f"device {spec} asked for, but CUDA is not available", hint="use device=cpu")
    if len(ids) > 1 and world_size() == 1:
        raise KdcliError(f"device {spec}: several GPUs train one run with DDP",
                         hint=f"run `torchrun --nproc_per_node {len(ids)} -m kdcli train ...` "
                              f"(CUDA_VISIBLE_DEVICES={spec})")
    index = local_rank() if world_size() > 1 else int(ids[0])
    if index >= torch.cuda.device_count():
        raise KdcliError(f"device {index} not found: {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", index)


def init(device: torch.device) -> None:
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= world_size()
    return values
