"""Model zoo by name, timm-style: ``@register_model(name)`` and ``create_model(name, ...)``.

Every model is a :class:`Classifier`: ``forward_features`` gives the penultimate feature (the vector the
final classifier reads, post-ReLU / post-pool) and ``forward_head`` the logits, so that methods can use
the teacher's feature (DAFL's activation loss, Dream Distillation's clusters) without knowing the
architecture.

Built in (all for 1- or 3-channel input; 32x32 is the reference size):

- ``lenet5``, ``lenet5_half``: LeNet-5 and its half-width student as in the official DAFL code
  (Chen et al., ICCV 2019, arXiv 1904.01186, Table 1). Need 32x32 input (DAFL resizes MNIST to 32).
- ``lenet5_quarter``, ``lenet5_double``, ``lenet5_triple``: the harness's LeNet-5 at x1/4 (rounded up), x2 and
  x3 widths, rungs of the CPU grids' student ladder (accuracy against latency across student sizes; at
  batch 1 on one CPU thread a LeNet's latency is mostly a fixed ~0.22 ms of per-layer overhead, so the
  ladder needs x3 widths to span 2x in latency).
- ``resnet18``, ``resnet34``: the CIFAR ResNets of the DAFL code (He et al., CVPR 2016, with a 3x3
  stem and no max-pool).
- ``resnet8``, ``resnet14``, ``resnet20`` (width 16) and ``resnet8_w4``, ``resnet8_w8``, ``resnet14_w8``: the thin
  CIFAR ResNets of He et al. (CVPR 2016, section 4.2), depth 6n+2, with the first stage's width as a field
  (:class:`ThinResNetSpec`); BatchNorm throughout. Rungs of the CPU grids' student ladder.
- ``mlp_1200``, ``mlp_800`` (and the narrower ``mlp_100``, ``mlp_30``): DAFL's HintonNets (Table 1), two ReLU hidden
  layers on the flattened 28x28 image (the model resizes the harness's 32-px input back to 28 px).
- ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``: Wide ResNets (Zagoruyko & Komodakis,
  BMVC 2016) as in RepDistiller's ``wrn.py``.
- ``vgg11``, ``vgg13``, ``vgg16`` (no BN) and ``vgg11_bn``, ``vgg13_bn``, ``vgg16_bn``: CIFAR VGG
  (Simonyan & Zisserman 2015) as in "Pruning Filters for Efficient ConvNets" (Li et al., ICLR 2017) and
  the FSKD sample (Li et al., CVPR 2020). Need at least 32x32 input (five 2x2 max-pools).
- ``timm:<name>`` and ``torchvision:<name>``: wrapped third-party architectures, built untrained at the
  dataset's image size (any size the architecture takes); a teacher may start from a local weights file
  (a grid pair's ``teacher_pretrained``, :func:`bench.teachers.load_pretrained`), never from a download.

A checkpoint saved from the third-party library itself (``timm.create_model(name).state_dict()``,
a torchvision model's ``state_dict()``) loads into the wrapper: :meth:`Classifier.map_foreign_key`
maps its keys to the wrapper's (``model.`` for timm; ``body.``/``head.`` for torchvision).

Nonlinearities are separate, non-inplace modules, so a forward hook on a conv sees its pre-activation
output unchanged (FSKD's 1x1 fitting, feature distillation) and pruning tools can walk the layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from bench.registry import Registry

__all__ = [
    "Classifier",
    "create_model",
    "features_and_logits",
    "list_models",
    "model_card",
    "register_model",
]

ModelFn = Callable[[int, int, int], "Classifier"]

# name -> fn(num_classes, in_channels, image_size); open forms ``timm:<name>`` / ``torchvision:<name>``
# -> fn(rest_of_name, num_classes, in_channels, image_size)
MODELS: Registry[Callable[..., "Classifier"]] = Registry("model")


class Classifier(nn.Module):
    """Uniform interface every zoo model has: penultimate feature + head.

    Subclasses set ``feature_dim`` and implement :meth:`forward_features` and :meth:`forward_head`;
    ``forward(x) == forward_head(forward_features(x))`` exactly.
    """

    feature_dim: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim): the penultimate feature fed to the head."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_features")

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits from the penultimate feature."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def map_foreign_key(self, key: str) -> str:
        """The name in this model's state dict of ``key`` from a checkpoint of the unwrapped architecture
        (identity for the zoo's own models, whose module names are the reference code's)."""
        return key

    def classifier_prefix(self) -> str:
        """The state-dict prefix of the final classifier (re-initialised when pretrained weights of another
        number of classes are loaded), e.g. ``fc2.``."""
        head = self.classifier_module()
        for name, module in self.named_modules():
            if module is head and name:
                return name + "."
        raise ValueError(f"{type(self).__name__}: cannot find its classifier module")

    def classifier_module(self) -> nn.Module:
        """The module that computes the logits from the penultimate feature."""
        raise NotImplementedError(f"{type(self).__name__} does not name its classifier module")


def features_and_logits(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate feature and the logits of ``model`` on ``x`` from one forward pass."""
    features = model.forward_features(x)
    return features, model.forward_head(features)


# ---------------------------------------------------------------------------------------------
# registry


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering ``fn(num_classes, in_channels, image_size) -> Classifier`` as ``name``."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of the registered models (not the open ``timm:<name>`` / ``torchvision:<name>`` forms)."""
    return MODELS.names()


def create_model(name: str, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """Build the model ``name`` (a registered name, ``timm:<name>`` or ``torchvision:<name>``), untrained.

    Raises:
        ValueError: unknown name (a :class:`~bench.config.ConfigError` listing the valid ones), bad
            sizes, or an input size the architecture cannot take.
    """
    for what, value, minimum in (("num_classes", num_classes, 1), ("in_channels", in_channels, 1),
                                 ("image_size", image_size, 1)):
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"create_model({name!r}): {what} must be an int >= {minimum}, got {value!r}")
    builder, rest = MODELS.resolve(name)
    if rest is not None:
        return builder(rest, num_classes, in_channels, image_size)
    return builder(num_classes, in_channels, image_size)


@dataclass(frozen=True)
class ModelCard:
    """What ``bench list models`` shows of a registered model, built untrained at a reference input."""

    name: str
    params: int
    macs: int
    batch_norm: bool  # has BatchNorm layers: may teach the methods that match BN statistics
    summary: str  # the first line of its builder's docstring


def model_card(name: str, in_channels: int = 1, image_size: int = 32, num_classes: int = 10) -> ModelCard:
    """Params, MACs (one image, :func:`bench.metrics.count_flops`) and traits of ``name`` at the grey 32-px reference
    input (Fashion-MNIST/MNIST as the harness loads them) unless told otherwise."""
    from bench.metrics import count_flops, count_params

    with torch.random.fork_rng():
        model = create_model(name, num_classes, in_channels, image_size)
    _, macs = count_flops(model, (in_channels, image_size, image_size))
    builder, _ = MODELS.resolve(name)
    doc = (builder.__doc__ or type(model).__doc__ or "").strip().splitlines()
    return ModelCard(name, count_params(model), macs, any(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
                     doc[0] if doc else "")


def _require_size(arch: str, image_size: int, *, exactly: int | None = None, at_least: int | None = None) -> None:
    if exactly is not None and image_size != exactly:
        raise ValueError(f"{arch} needs {exactly}x{exactly} input, got image_size={image_size} "
                         f"(resize the images to {exactly}, as DAFL does for MNIST)")
    if at_least is not None and image_size < at_least:
        raise ValueError(f"{arch} needs image_size >= {at_least}, got {image_size}")


# ---------------------------------------------------------------------------------------------
# LeNet-5 (DAFL, official lenet.py)


class LeNet5(Classifier):
    """LeNet-5 as in the official DAFL code (Chen et al., ICCV 2019).

    conv5(C->c1) ReLU maxpool2, conv5(c1->c2) ReLU maxpool2, conv5(c2->c3) ReLU -> feature (c3-d),
    head: FC c3->h ReLU FC h->classes. ``lenet5``: (6, 16, 120, 84), 61,706 params with C=1 and 10
    classes (~62K, DAFL Table 1); ``lenet5_half``: (3, 8, 60, 42), 15,738 params (~16K). 32x32 input.
    The harness's ladder adds ``lenet5_quarter`` (2, 4, 30, 21), ``lenet5_double`` (12, 32, 240, 168) and
    ``lenet5_triple`` (18, 48, 360, 252).
    ``batch_norm``: a BatchNorm2d after each conv, before its ReLU (``lenet5_bn``: the harness's BN
    teacher for the methods that match BatchNorm statistics, which BN-free LeNet-5 cannot serve).
    """

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, int, int, int],
                 batch_norm: bool = False) -> None:
        super().__init__()
        c1, c2, c3, hidden = widths
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5)
        self.bn1 = norm(c1)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.bn2 = norm(c2)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=5)
        self.bn3 = norm(c3)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(c3, hidden)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)
        self.feature_dim = c3

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.maxpool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return torch.flatten(x, 1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu4(self.fc1(f)))

    def classifier_module(self) -> nn.Module:
        return self.fc2


LENET5_WIDTHS = (6, 16, 120, 84)


@register_model("lenet5")
def lenet5(num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    _require_size("lenet5", image_size, exactly=32)
    return LeNet5(num_classes, in_channels, LENET5_WIDTHS)


@register_model("lenet5_half")
def lenet5_half(num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    _require_size("lenet5_half", image_size, exactly=32)
    return LeNet5(num_classes, in_channels, (3, 8, 60, 42))


@register_model("lenet5_quarter")
def lenet5_quarter(num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    """LeNet-5 at a quarter of its widths, (2, 4, 30, 21): 4,157 params with C=1 and 10 classes (harness ladder)."""
    _require_size("lenet5_quarter", image_size, exactly=32)
    return LeNet5(num_classes, in_channels, (2, 4, 30, 21))


@register_model("lenet5_double")
def lenet5_double(num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    """LeNet-5 at twice its widths, (12, 32, 240, 168): 244,362 params with C=1 and 10 classes (harness ladder)."""
    _require_size("lenet5_double", image_size, exactly=32)
    return LeNet5(num_classes, in_channels, tuple(2 * w for w in LENET5_WIDTHS))


@register_model("lenet5_triple")
def lenet5_triple(num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    """LeNet-5 at three times its widths, (18, 48, 360, 252): 547,978 params with C=1 and 10 classes (harness ladder)."""
    _require_size("lenet5_triple", image_size, exactly=32)
    return LeNet5(num_classes, in_channels, tuple(3 * w for w in LENET5_WIDTHS))


@register_model("lenet5_bn")
def lenet5_bn(num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    """LeNet-5 with BatchNorm after each conv (61,990 params with C=1, 10 classes): the BN teacher of the CPU grids."""
    _require_size("lenet5_bn", image_size, exactly=32)
    return LeNet5(num_classes, in_channels, LENET5_WIDTHS, batch_norm=True)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet (DAFL, official resnet.py; He et al., CVPR 2016)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(Classifier):
    """CIFAR ResNet as in the DAFL code: 3x3 stem (64, stride 1) + BN + ReLU, no max-pool, four stages
    of basic blocks at 64/128/256/512, global average pool (DAFL: 4x4 avg pool at 32px; adaptive here
    so other sizes work), 512-d feature, linear head. Module names match the official code, so its
    checkpoints load."""

    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512 * BasicBlock.expansion
        self.linear = nn.Linear(self.feature_dim, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.avgpool(out), 1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f)

    def classifier_module(self) -> nn.Module:
        return self.linear


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    """CIFAR ResNet-18 (DAFL's CIFAR student): 11.17M params with 10 classes."""
    return CifarResNet([2, 2, 2, 2], num_classes, in_channels)


@register_model("resnet34")
def resnet34(num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    """CIFAR ResNet-34 (DAFL's CIFAR teacher): 21.28M params with 10 classes."""
    return CifarResNet([3, 4, 6, 3], num_classes, in_channels)


# ---------------------------------------------------------------------------------------------
# Thin CIFAR ResNets, depth 6n+2 (He et al., CVPR 2016, section 4.2)


@dataclass(frozen=True)
class ThinResNetSpec:
    """A thin CIFAR ResNet: ``depth`` = 6n+2 (n basic blocks per stage) and ``width`` = the first stage's
    channels (the paper's 16; the stages have width, 2*width, 4*width)."""

    depth: int
    width: int = 16

    def __post_init__(self) -> None:
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ValueError(f"a thin CIFAR ResNet's depth must be 6n+2 >= 8 (8, 14, 20, 32, ...), got {self.depth}")
        if self.width < 1:
            raise ValueError(f"a thin CIFAR ResNet's width must be >= 1, got {self.width}")


class ThinResNet(Classifier):
    """The CIFAR ResNet of He et al. (CVPR 2016, section 4.2): a 3x3 stem conv to ``width`` + BN + ReLU, three
    stages of n post-activation basic blocks at ``width``, 2x and 4x (strides 1, 2, 2: 32, 16, 8 px at 32 px
    input), global average pool, a 4*width feature and a linear head; 6n+2 weighted layers. The paper's
    shortcuts that change shape are zero-padded identities (its option A); here they are 1x1 conv + BN (option B,
    the blocks of :class:`CifarResNet`), which exports to ONNX as plain convolutions. Has BatchNorm, so it can be
    the teacher of the methods that match BN statistics."""

    def __init__(self, spec: ThinResNetSpec, num_classes: int, in_channels: int) -> None:
        super().__init__()
        n, w = (spec.depth - 2) // 6, spec.width
        self.conv1 = nn.Conv2d(in_channels, w, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        stages, in_planes = [], w
        for planes, stride in ((w, 1), (2 * w, 2), (4 * w, 2)):
            stages.append(nn.Sequential(*[BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                                          for i in range(n)]))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * w
        self.linear = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():  # He et al. initialisation, as in the paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(self.avgpool(out), 1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f)

    def classifier_module(self) -> nn.Module:
        return self.linear


# name -> spec: the paper's ResNet-8/14/20 at width 16, and narrower rungs of the CPU grids' student ladder
THIN_RESNETS: dict[str, ThinResNetSpec] = {
    "resnet8_w4": ThinResNetSpec(8, 4),
    "resnet8_w8": ThinResNetSpec(8, 8),
    "resnet8": ThinResNetSpec(8, 16),
    "resnet14_w8": ThinResNetSpec(14, 8),
    "resnet14": ThinResNetSpec(14, 16),
    "resnet20": ThinResNetSpec(20, 16),
}


def _register_thin_resnet(name: str, spec: ThinResNetSpec) -> None:
    def build(num_classes: int, in_channels: int, image_size: int) -> ThinResNet:
        _require_size(name, image_size, at_least=4)
        return ThinResNet(spec, num_classes, in_channels)

    build.__doc__ = (f"CIFAR ResNet-{spec.depth} at width {spec.width} (He et al., CVPR 2016, section 4.2; "
                     f"stages {spec.width}/{2 * spec.width}/{4 * spec.width}).")
    register_model(name)(build)


for _name, _spec in THIN_RESNETS.items():
    _register_thin_resnet(_name, _spec)


# ---------------------------------------------------------------------------------------------
# HintonNets: two-hidden-layer ReLU MLPs (DAFL, Chen et al., ICCV 2019, Table 1)

MLP_SIDE = 28  # the MLPs read the 28x28 image of MNIST-like data, flattened to 784 inputs (DAFL Table 1)


class MLP(Classifier):
    """A two-hidden-layer ReLU MLP on the flattened 28x28 image: the HintonNets of DAFL (Chen et al., ICCV 2019,
    Table 1; Hinton et al. 2015's MNIST nets): ``mlp_1200`` 784-1200-1200-10 (teacher there) and ``mlp_800``
    784-800-800-10 (student there).

    The harness's grey datasets arrive at 32x32 (the loaders resize MNIST/Fashion-MNIST 28 -> 32 bilinearly, for
    LeNet-5), so the model first resizes its input back to 28x28 (bilinear, ``align_corners=False``; no weights, no
    MACs counted) and flattens it to 784 values: the layer sizes are exactly the paper's. An input already 28 px
    passes unchanged. Layers: fc1 ReLU fc2 ReLU -> feature (hidden-d), head fc3.
    """

    def __init__(self, num_classes: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * MLP_SIDE * MLP_SIDE, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != MLP_SIDE or x.shape[-2] != MLP_SIDE:
            x = nn.functional.interpolate(x, size=(MLP_SIDE, MLP_SIDE), mode="bilinear", align_corners=False)
        return self.relu2(self.fc2(self.relu1(self.fc1(torch.flatten(x, 1)))))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc3(f)

    def classifier_module(self) -> nn.Module:
        return self.fc3


# name -> hidden width: DAFL's two HintonNets, and smaller rungs of the CPU grids' student ladder
MLP_WIDTHS: dict[str, int] = {"mlp_1200": 1200, "mlp_800": 800, "mlp_100": 100, "mlp_30": 30}


def _register_mlp(name: str, hidden: int) -> None:
    def build(num_classes: int, in_channels: int, image_size: int) -> MLP:
        _require_size(name, image_size, at_least=MLP_SIDE)
        return MLP(num_classes, in_channels, hidden)

    source = "a HintonNet of DAFL Table 1" if name in ("mlp_1200", "mlp_800") else "a narrower HintonNet, harness ladder"
    build.__doc__ = f"MLP {MLP_SIDE * MLP_SIDE}-{hidden}-{hidden}-classes ({source}), reads the 28x28 image."
    register_model(name)(build)


for _name, _hidden in MLP_WIDTHS.items():
    _register_mlp(_name, _hidden)


# ---------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis, BMVC 2016; RepDistiller's wrn.py)


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 conv shortcut on the activated
    input when the width changes (as in RepDistiller / the authors' code). No dropout (drop rate 0)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(activated)
        return shortcut + out


class WideResNet(Classifier):
    """WRN-depth-k: 3x3 stem conv to 16, three groups of n = (depth-4)/6 blocks at widths 16k, 32k,
    64k (strides 1, 2, 2), final BN + ReLU + global average pool, 64k-d feature, linear head."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(n, widths[0], widths[1], stride=1)
        self.block2 = self._make_group(n, widths[1], widths[2], stride=2)
        self.block3 = self._make_group(n, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # initialisation of the reference implementation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_group(n: int, in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                              stride if i == 0 else 1) for i in range(n)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return torch.flatten(self.avgpool(out), 1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def classifier_module(self) -> nn.Module:
        return self.fc


def _register_wrn(depth: int, widen_factor: int) -> None:
    name = f"wrn_{depth}_{widen_factor}"

    def build(num_classes: int, in_channels: int, image_size: int) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, in_channels)

    build.__doc__ = f"WRN-{depth}-{widen_factor} (Zagoruyko & Komodakis 2016)."
    register_model(name)(build)


for _depth, _k in [(16, 1), (16, 2), (40, 1), (40, 2)]:
    _register_wrn(_depth, _k)


# ---------------------------------------------------------------------------------------------
# CIFAR VGG (Li et al., ICLR 2017 "Pruning Filters for Efficient ConvNets"; the FSKD sample)

_VGG_CFGS: dict[str, list[int | str]] = {  # torchvision's configurations A, B, D
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class CifarVGG(Classifier):
    """CIFAR VGG: conv3x3 (pad 1, with bias) [+ BN] + ReLU per layer, 2x2 max-pool after each stage, in
    the nn.Sequential ``features``; at 32x32 the stack ends at 512x1x1 (a global average pool makes
    larger inputs end there too); feature = the flattened 512 vector; head: one Linear(512, classes)."""

    def __init__(self, cfg: list[int | str], batch_norm: bool, num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU())
            channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(f)

    def classifier_module(self) -> nn.Module:
        return self.classifier


def _register_vgg(name: str, batch_norm: bool) -> None:
    cfg = _VGG_CFGS[name]
    full_name = name + ("_bn" if batch_norm else "")

    def build(num_classes: int, in_channels: int, image_size: int) -> CifarVGG:
        _require_size(full_name, image_size, at_least=2 ** cfg.count("M"))
        return CifarVGG(cfg, batch_norm, num_classes, in_channels)

    build.__doc__ = f"CIFAR {full_name} ({'with' if batch_norm else 'without'} BatchNorm), needs >= 32x32 input."
    register_model(full_name)(build)


for _name in _VGG_CFGS:
    for _bn in (False, True):
        _register_vgg(_name, _bn)


# ---------------------------------------------------------------------------------------------
# timm:<name>


class TimmClassifier(Classifier):
    """A timm model split at its pre-logits: ``forward_head(forward_features(x), pre_logits=True)`` is
    the feature, ``get_classifier()`` the head."""

    def __init__(self, model: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.model = model
        self.feature_dim = feature_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(f)

    def map_foreign_key(self, key: str) -> str:
        return "model." + key  # timm's own state dict: the wrapper keeps the model as ``model``

    def classifier_module(self) -> nn.Module:
        return self.model.get_classifier()


def _create_timm(name: str, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    from bench._vision import import_timm

    timm = import_timm()
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; valid: timm.list_models(), e.g. "
                         f"{', '.join(timm.list_models('resnet*')[:5])} ...")
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels)
    try:  # transformers and MLP mixers take the input size; CNNs reject the keyword
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(name, **kwargs)
    head = model.get_classifier()
    if not isinstance(head, nn.Module):
        raise ValueError(f"timm:{name} has a {type(head).__name__} classifier (e.g. a distillation head "
                         f"pair); only models with one classifier module are supported")
    feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return _checked(f"timm:{name}", TimmClassifier(model, feature_dim), in_channels, image_size)


MODELS.register("timm", prefix="<name>")(_create_timm)


# ---------------------------------------------------------------------------------------------
# torchvision:<name>


@dataclass(frozen=True)
class _TorchvisionFamily:
    """Where a torchvision family keeps its first conv (``stem``) and final Linear (``head``)."""

    stem: str
    head: str


# Longest matching name prefix wins. Each entry was checked to build and forward at 32x32.
_TORCHVISION_FAMILIES: dict[str, _TorchvisionFamily] = {
    "resnet": _TorchvisionFamily(stem="conv1", head="fc"),
    "resnext": _TorchvisionFamily(stem="conv1", head="fc"),
    "wide_resnet": _TorchvisionFamily(stem="conv1", head="fc"),
    "mobilenet_v2": _TorchvisionFamily(stem="features.0.0", head="classifier.1"),
    "mobilenet_v3": _TorchvisionFamily(stem="features.0.0", head="classifier.3"),
    "vgg": _TorchvisionFamily(stem="features.0", head="classifier.6"),
    "efficientnet": _TorchvisionFamily(stem="features.0.0", head="classifier.1"),
    "shufflenet_v2": _TorchvisionFamily(stem="conv1.0", head="fc"),
    "regnet": _TorchvisionFamily(stem="stem.0", head="fc"),
}


class TorchvisionClassifier(Classifier):
    """A torchvision classifier whose final Linear was replaced by Identity (``body``), so that
    ``body(x)`` is the penultimate feature; the Linear is kept as ``head``."""

    def __init__(self, body: nn.Module, head: nn.Linear, head_name: str = "") -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.head_name = head_name  # where torchvision keeps the final Linear (e.g. "fc")
        self.feature_dim = head.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def map_foreign_key(self, key: str) -> str:
        # torchvision's own state dict: the final Linear (e.g. fc.weight) is our head, the rest our body
        if self.head_name and key.startswith(self.head_name + "."):
            return "head." + key[len(self.head_name) + 1:]
        return "body." + key

    def classifier_module(self) -> nn.Module:
        return self.head


def _create_torchvision(name: str, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    from bench._vision import import_torchvision

    models = import_torchvision().models
    valid = models.list_models(module=models)
    family_key = max((k for k in _TORCHVISION_FAMILIES if name.startswith(k)), key=len, default=None)
    if family_key is None or name not in valid:
        supported = sorted(n for n in valid if any(n.startswith(k) for k in _TORCHVISION_FAMILIES))
        raise ValueError(f"torchvision:{name} is not supported; supported torchvision classifiers: "
                         f"{', '.join(supported)}")
    family = _TORCHVISION_FAMILIES[family_key]
    model = models.get_model(name, weights=None, num_classes=num_classes)
    stem = model.get_submodule(family.stem)
    head = model.get_submodule(family.head)
    if not isinstance(stem, nn.Conv2d) or not isinstance(head, nn.Linear):
        raise ValueError(f"torchvision:{name}: expected a Conv2d at {family.stem!r} and a Linear at "
                         f"{family.head!r}, found {type(stem).__name__} and {type(head).__name__}")
    if in_channels != stem.in_channels:
        model.set_submodule(family.stem, nn.Conv2d(
            in_channels, stem.out_channels, kernel_size=stem.kernel_size, stride=stem.stride,
            padding=stem.padding, dilation=stem.dilation, groups=stem.groups, bias=stem.bias is not None))
    model.set_submodule(family.head, nn.Identity())
    return _checked(f"torchvision:{name}", TorchvisionClassifier(model, head, family.head), in_channels, image_size)


MODELS.register("torchvision", prefix="<name>")(_create_torchvision)


def _checked(name: str, model: Classifier, in_channels: int, image_size: int) -> Classifier:
    """Run one eval-mode forward on a zero image, so that an input size the third-party architecture
    cannot take fails here, with its name, rather than mid-run."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, in_channels, image_size, image_size))
    except RuntimeError as exc:
        raise ValueError(f"{name} cannot take {in_channels}x{image_size}x{image_size} input: {exc}") from exc
    finally:
        model.train(was_training)
    if tuple(features.shape) != (1, model.feature_dim):
        raise ValueError(f"{name}: feature shape {tuple(features.shape)} is not (1, {model.feature_dim}); "
                         f"this architecture cannot be wrapped as a Classifier")
    return model


def architecture_code(name: str) -> str:
    """A hash of the code that builds model ``name``: its registered builder and every class of this module
    it instantiates (the zoo's other models are not part of it, so adding a model re-trains no cached
    teacher and re-runs no cell). ``timm:``/``torchvision:`` models: the wrapper's code and the library's version."""
    import importlib.metadata

    from bench.provenance import objects_hash

    builder, rest = MODELS.resolve(name)
    if rest is None:
        with torch.random.fork_rng():
            model = builder(10, 3, 32)  # every zoo model builds at 32 px; the classes, not the sizes, matter here
        classes = sorted({type(m) for m in model.modules() if type(m).__module__ == __name__}, key=lambda c: c.__name__)
        return objects_hash([builder, *classes])
    library = name.partition(":")[0]
    try:
        version = importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    wrapper = TimmClassifier if library == "timm" else TorchvisionClassifier
    return f"{objects_hash([builder, wrapper, _checked])}-{library}{version}"
