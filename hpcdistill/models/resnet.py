"""GroupNorm ResNets whose forward returns (final conv feature map, logits), written here (no torchvision) so the
normalisation, the stem and the returned feature map are ours to choose.

GroupNorm replaces BatchNorm (paper §3.5): whole tissues train at micro-batch 1 with accumulation, where batch
statistics mean nothing. The group count is capped at, and divides, the channel count, so narrow models build.
`stem` trades a student's compute for the detail it keeps at low magnification (N x below the teacher's):

  ============  ==========================================  ============  ===========================
  stem          layers                                      total stride  student FLOPs / teacher's
  ============  ==========================================  ============  ===========================
  ``standard``  7x7 stride-2 conv + 3x3 stride-2 max-pool   32            ~1/N^2 (1/16 at 2.5x)
  ``halfres``   3x3 stride-2 conv, no max-pool               16            ~4/N^2 (1/4 at 2.5x)
  ``lowres``    3x3 stride-1 conv, no max-pool               8             ~16/N^2 (about 1 at 2.5x)
  ============  ==========================================  ============  ===========================

The paper used the standard stem for both models, which suits its large whole-tissue inputs; on small low-mag
tissues it leaves a 1x1 or 2x2 map, and the pixel loss then matches only a global summary of the teacher's map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcdistill.common.errors import ModelError
from hpcdistill.config.schema import ARCHS as ARCH_NAMES
from hpcdistill.config.schema import STEMS


def group_count(groups: int, channels: int) -> int:
    """Largest divisor of `channels` that is <= min(groups, channels) (GroupNorm needs groups | channels)."""
    cap = max(1, min(groups, channels))
    return next(g for g in range(cap, 0, -1) if channels % g == 0)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(groups, channels), channels)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def shortcut(cin: int, cout: int, stride: int, groups: int) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 projection + GroupNorm."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv1x1(cin, cout, stride), group_norm(cout, groups))


class ResidualBlock(nn.Module):
    """conv -> GroupNorm layers (ReLU between them), added to the shortcut, then ReLU. Layers are named conv1, gn1,
    conv2, ... as in torchvision, so state dicts read naturally."""

    expansion = 1

    def __init__(self, convs: list[nn.Conv2d], cin: int, stride: int, groups: int) -> None:
        super().__init__()
        self.depth = len(convs)
        for i, conv in enumerate(convs, 1):
            setattr(self, f"conv{i}", conv)
            setattr(self, f"gn{i}", group_norm(conv.out_channels, groups))
        self.shortcut = shortcut(cin, convs[-1].out_channels, stride, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.depth + 1):
            out = getattr(self, f"gn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.depth:
                out = F.relu(out)
        return F.relu(out + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-10/18/34)."""

    def __init__(self, cin: int, planes: int, stride: int, groups: int) -> None:
        super().__init__([conv3x3(cin, planes, stride), conv3x3(planes, planes)], cin, stride, groups)


class Bottleneck(ResidualBlock):
    """ResNet v1.5 bottleneck (ResNet-50): 1x1, 3x3 carrying the stride, 1x1 expanding 4x."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, groups: int) -> None:
        super().__init__(
            [conv1x1(cin, planes), conv3x3(planes, planes, stride), conv1x1(planes, planes * 4)], cin, stride, groups
        )


ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
assert tuple(ARCHS) == ARCH_NAMES, "config.Arch and this table must name the same architectures"


class ResNet(nn.Module):
    """forward(x) -> (features (N, feature_dim, h, w) before pooling, logits (N, num_classes)).

    Any input size works, down to 1x1 (every stride-2 layer pads, so maps never vanish); adaptive average
    pooling makes the classifier size-independent, which whole-tissue inputs need.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: tuple[int, ...],
        num_classes: int,
        *,
        width: int = 64,
        groups: int = 32,
        stem: str = "standard",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if stem == "standard":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False),
                group_norm(width, groups),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:  # "halfres" halves the input once; "lowres" keeps full resolution into layer 1
            stride = 2 if stem == "halfres" else 1
            self.stem = nn.Sequential(
                conv3x3(in_chans, width, stride), group_norm(width, groups), nn.ReLU(inplace=True)
            )
        stages = []
        cin = width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(block(cin, planes, stride if b == 0 else 1, groups))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """He init (fan_out, ReLU) for convs; GroupNorm weight 1, bias 0; Linear keeps PyTorch's default.

        Explicit about GroupNorm: init code written for BatchNorm models (an `isinstance(m, nn.BatchNorm2d)` branch)
        would skip it, which is harmless only because GroupNorm's own default is also (1, 0).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return x, logits


def build_model(
    arch: str, num_classes: int, *, width: int = 64, groups: int = 32, stem: str = "standard", in_chans: int = 3
) -> ResNet:
    """Build a GroupNorm ResNet; `model.arch_kwargs` rebuilds it: `build_model(**model.arch_kwargs)`.

    Use `model.to(memory_format=torch.channels_last)` (and channels-last inputs) for channels-last.
    Tiny inputs: a GroupNorm group needs more than one value. With width <= groups a group is a single
    channel, so a 1x1 map (e.g. a 16 px input, standard stem, width 8) has nothing to normalise and torch
    raises at batch 1; keep width >= 2 * groups (the default 64/32 does) or use stem="lowres".
    """
    if arch not in ARCHS:
        raise ModelError(f"arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise ModelError(f"stem: unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    for key, value in (("num_classes", num_classes), ("width", width), ("groups", groups), ("in_chans", in_chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{key}: must be a positive integer, got {value!r}")
    block, layers = ARCHS[arch]
    model = ResNet(block, layers, num_classes, width=width, groups=groups, stem=stem, in_chans=in_chans)
    model.arch_kwargs = dict(
        arch=arch, num_classes=num_classes, width=width, groups=groups, stem=stem, in_chans=in_chans
    )
    return model
