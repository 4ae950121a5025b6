"""torchvision ResNets as feature trunks returning C4 (layer3) and C5 (layer4).

With the stem max-pool removed (ScratchDet; the default), C4 and C5 sit at strides 8 and 16, which keeps small
vehicles visible; `maxpool=True` restores torchvision's strides 16 and 32.

ImageNet weights are never downloaded: `pretrained` is a path to a torchvision `.pth` file, or `True` to take
the file torchvision would have cached in the torch hub cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from kdcli.errors import KdcliError
from kdcli.models.blocks import norm_layer

OUT_CHANNELS = {"resnet18": (256, 512), "resnet34": (256, 512), "resnet50": (1024, 2048),
                "resnet101": (1024, 2048)}
WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
           "resnet101": "ResNet101_Weights"}


def weights_file(name: str) -> Path:
    """Where torchvision caches the ImageNet weights of `name` (the torch hub cache)."""
    url = getattr(torchvision.models, WEIGHTS[name]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_pretrained(net: nn.Module, name: str, pretrained: bool | str) -> None:
    path = weights_file(name) if pretrained is True else Path(str(pretrained)).expanduser()
    if not path.is_file():
        url = getattr(torchvision.models, WEIGHTS[name]).IMAGENET1K_V1.url
        raise KdcliError(f"ImageNet weights for {name} not found at {path}",
                         hint=f"download {url} and put it at {weights_file(name)} (the torch hub cache), or set "
                              f"model.pretrained=/path/to/file.pth, or model.pretrained=false to train from scratch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise KdcliError(f"{path}: cannot read ImageNet weights ({type(e).__name__}: {e})") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise KdcliError(f"{path}: not {name} weights (missing {missing[:3]}, unexpected {unexpected[:3]})")


class ResNetTrunk(nn.Module):
    """Stem + layer1..4 of a torchvision ResNet; forward returns (C4, C5). `norm="gn"` swaps every BatchNorm for
    GroupNorm (32 groups), for training from scratch on small batches (He et al., Rethinking ImageNet
    Pre-training, 2019); ImageNet weights are BatchNorm weights, so it needs `pretrained=False`."""

    def __init__(self, name: str = "resnet18", pretrained: bool | str = False, maxpool: bool = False,
                 norm: str = "bn"):
        super().__init__()
        if norm == "gn" and pretrained:
            raise KdcliError("model.backbone_norm=gn trains the backbone from scratch: ImageNet weights are "
                             "BatchNorm weights", hint="set model.pretrained=false, or model.backbone_norm=bn")
        layer = (lambda c: norm_layer("gn", c)) if norm == "gn" else None
        net = getattr(torchvision.models, name)(weights=None, **({"norm_layer": layer} if layer else {}))
        if pretrained:
            load_pretrained(net, name, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool if maxpool else nn.Identity())
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = OUT_CHANNELS[name]
        self.strides = (16, 32) if maxpool else (8, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return c4, self.layer4(c4)
