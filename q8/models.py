"""Float models: torchvision ResNet-18/50, MobileNetV2 and ShuffleNetV2 (each also with a stem for
32x32-sized images, `_cifar`), CIFAR-style ResNets, a Vision Transformer and a recurrent net that
reads images row by row. q8.convert quantizes them."""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """The CIFAR ResNet block (He et al. 2016, section 4.2) with a 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.relu = nn.ReLU(inplace=True)  # a module, so q8.convert can swap it

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: three stages of n blocks, widths w, 2w, 4w."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an int >= 1, got {width!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, planes = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out = width * 2**stage
            blocks = [BasicBlock(planes, out, stride)] + [BasicBlock(out, out) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            planes = out
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(planes, num_classes)
        self.relu = nn.ReLU(inplace=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _torchvision_resnet(arch: str, small_input: bool) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)
        if small_input:  # 32x32 images: a 3x3 stride-1 stem and no max-pool
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return model

    return build


def _stem(conv: nn.Conv2d, in_channels: int, small_input: bool) -> nn.Conv2d:
    """The first convolution for this input: its channels, and stride 1 for 32x32-sized images."""
    stride = 1 if small_input else conv.stride
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride, conv.padding, bias=conv.bias is not None)


def _mobilenet_v2(small_input: bool) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, **kwargs) -> nn.Module:
        """torchvision's MobileNetV2 (depthwise-separable inverted residuals, linear bottlenecks, ReLU6)."""
        if not (isinstance(width_mult, (int, float)) and width_mult > 0):
            raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult, **kwargs)
        model.features[0][0] = _stem(model.features[0][0], in_channels, small_input)
        return model

    return build


SHUFFLENET_WIDTHS = {0.5: "shufflenet_v2_x0_5", 1.0: "shufflenet_v2_x1_0", 1.5: "shufflenet_v2_x1_5", 2.0: "shufflenet_v2_x2_0"}


def _shufflenet_v2(small_input: bool) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        """torchvision's ShuffleNetV2 (channel split and shuffle, depthwise convolutions) at a width."""
        if width not in SHUFFLENET_WIDTHS:
            raise ValueError(f"width must be one of {sorted(SHUFFLENET_WIDTHS)}, got {width!r}")
        model = getattr(torchvision.models, SHUFFLENET_WIDTHS[width])(weights=None, num_classes=num_classes)
        model.conv1[0] = _stem(model.conv1[0], in_channels, small_input)
        if small_input:
            model.maxpool = nn.Identity()
        return model

    return build


def vit(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, patch_size: int = 16, num_layers: int = 12,
        num_heads: int = 12, hidden_dim: int = 768, mlp_dim: int = 3072, dropout: float = 0.0) -> nn.Module:
    """torchvision's VisionTransformer (ViT-B/16 by default); image_size is the data's."""
    if image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image size {image_size}")
    model = torchvision.models.VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                                                 dropout=dropout, num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
    return model


class RowRNN(nn.Module):
    """A recurrent classifier that reads an image one row per time step (the row's pixels of every
    channel: in_channels * image_size features), as in sequential-MNIST studies: an nn.LSTM or
    nn.GRU, then a linear head on the last layer's final hidden state (both directions')."""

    CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, cell: str = "lstm",
                 hidden_size: int = 128, num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0):
        super().__init__()
        if cell not in self.CELLS:
            raise ValueError(f"cell must be one of {sorted(self.CELLS)}, got {cell!r}")
        self.image_size = image_size
        self.rnn = self.CELLS[cell](in_channels * image_size, hidden_size, num_layers, batch_first=True,
                                    dropout=dropout, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if w != self.image_size:
            raise ValueError(f"RowRNN was built for rows of {self.image_size} pixels, got images {h}x{w}")
        _, state = self.rnn(x.permute(0, 2, 1, 3).reshape(n, h, c * w))
        h_n = state[0] if isinstance(state, tuple) else state  # (layers * directions, N, H)
        last = h_n[-(2 if self.rnn.bidirectional else 1):]
        return self.fc(last.transpose(0, 1).reshape(n, -1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _torchvision_resnet("resnet18", small_input=False),
    "resnet50": _torchvision_resnet("resnet50", small_input=False),
    "resnet18_cifar": _torchvision_resnet("resnet18", small_input=True),
    "resnet20": lambda **kw: CifarResNet(20, **kw),
    "resnet56": lambda **kw: CifarResNet(56, **kw),
    "mobilenet_v2": _mobilenet_v2(small_input=False),
    "mobilenet_v2_cifar": _mobilenet_v2(small_input=True),
    "shufflenet_v2": _shufflenet_v2(small_input=False),
    "shufflenet_v2_cifar": _shufflenet_v2(small_input=True),
    "vit": vit,
    "row_rnn": RowRNN,
}


def check_kwargs(name: str, kwargs: dict) -> None:
    """Raise TypeError / ValueError naming the problem if MODELS[name] does not accept kwargs
    (the model is built on the meta device: no memory, no time)."""
    try:
        with torch.device("meta"):
            build(name, **kwargs)
    except TypeError as err:
        raise TypeError(f"{name} does not take these arguments: {err}") from None


def build(name: str, num_classes: int = 10, in_channels: int = 3, image_size: Optional[int] = None,
          **kwargs) -> nn.Module:
    """A float model by name (see MODELS); pass it through q8.convert to quantize it. image_size
    (the data's) goes to the models that are built for one size (ViT) and is ignored by the rest."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if image_size is not None and "image_size" in inspect.signature(MODELS[name]).parameters:
        kwargs.setdefault("image_size", image_size)
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
