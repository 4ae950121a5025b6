"""Optional speed-ups of a network's forward: NHWC memory layout and torch.compile (`train.channels_last`,
`train.compile`). Both are off by default: on a CPU neither paid in `kdcli benchmark` (docs/performance.md),
and compile adds minutes of first steps that short runs never win back. `nn.Module.compile` compiles in place, so
state dicts, checkpoints and the EMA copy keep their plain parameter names.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from kdcli.errors import KdcliError


def compile_forward(module: nn.Module, device: torch.device) -> nn.Module:
    """Compile `module`'s forward in place; on a CPU inductor needs a C++ compiler, checked here rather than at
    the first step (where torch would fail with a long traceback)."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise KdcliError(f"train.compile on a CPU needs a C++ compiler ({cxx} not found)",
                             hint="install g++ (or set CXX), or set train.compile=false")
    module.compile()
    return module
