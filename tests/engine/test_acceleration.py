"""train.channels_last and train.compile: the same training in another memory layout, a clear error without a
compiler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcli.engine import checkpoint
from kdcli.engine.acceleration import compile_forward
from kdcli.engine.trainer import Trainer
from kdcli.errors import KdcliError
from tests.conftest import tiny_recipe


def test_channels_last_trains_the_same_model(tmp_path: Path, vedai25: Path):
    plain = tiny_recipe(vedai25, train={"epochs": 1, "ema": False, "deterministic": True})
    nhwc = tiny_recipe(vedai25, train={"epochs": 1, "ema": False, "deterministic": True, "channels_last": True})
    Trainer(plain, run_dir=tmp_path / "plain").fit()
    layouts: list[bool] = []

    class Watch(Trainer):
        def compute_loss(self, batch):
            layouts.append(batch["images"].is_contiguous(memory_format=torch.channels_last))
            first_conv = next(p for p in self.model.parameters() if p.dim() == 4)
            layouts.append(first_conv.is_contiguous(memory_format=torch.channels_last))
            return super().compute_loss(batch)

    Watch(nhwc, run_dir=tmp_path / "nhwc").fit()
    assert layouts and all(layouts)
    a = checkpoint.load(tmp_path / "plain" / "weights" / "last.pt").weights
    b = checkpoint.load(tmp_path / "nhwc" / "weights" / "last.pt").weights
    assert a.keys() == b.keys()
    for k in a:  # two SGD steps apart only by the convolutions' summation order
        assert torch.allclose(a[k].float(), b[k].float(), atol=5e-3, rtol=1e-2), k
    la = (tmp_path / "plain" / "results.csv").read_text().splitlines()[1].split(",")[1]
    lb = (tmp_path / "nhwc" / "results.csv").read_text().splitlines()[1].split(",")[1]
    assert float(la) == pytest.approx(float(lb), rel=1e-3)


def test_compile_on_a_cpu_without_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CXX", "no-such-compiler-kdcli")
    with pytest.raises(KdcliError, match="no-such-compiler-kdcli not found"):
        compile_forward(torch.nn.Conv2d(3, 3, 1), torch.device("cpu"))


def test_compile_keeps_plain_parameter_names():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    names = list(net.state_dict())
    compile_forward(net, torch.device("meta"))  # not a CPU: no compiler check; nothing runs
    assert list(net.state_dict()) == names and isinstance(net, torch.nn.Sequential)
