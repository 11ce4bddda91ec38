"""Attention transfer (Zagoruyko and Komodakis, ICLR 2017), as ZSKT uses it.

The attention map of an activation ``x`` (B, C, H, W) is the channel mean of its squares, flattened and
L2-normalised per sample:

    a(x) = normalise(mean_c x_c^2)         (B, H*W), ||a(x)_i||_2 = 1

and the attention loss between a student and a teacher compares the maps of matched layers:

    L_AT = sum over layers of mean((a(s) - a(t))^2)     (mean over batch and positions)

which is ZSKT's ``attention_diff`` (polo5/ZeroShotKnowledgeTransfer, solver.py, "taken from
szagoruyko/attention-transfer"); ZSKT weights it by beta = 250.

Which layers: ZSKT compares the outputs of the block groups of its WideResNets (``block1..3``, before the
final BN-ReLU) and, for its LeNet, the outputs of the first two convolutions after their (in-place) ReLU,
before max-pooling (models/lenet.py). :func:`attention_layers` gives the same choice for the zoo's
models, by module name (teacher and student layers are matched by name):

- LeNet-5 family (``lenet5``, ``lenet5_bn``, ``lenet5_half``): ``relu1``, ``relu2`` (28x28 and 10x10 at
  32-px input). The third conv block is 1x1: its normalised attention map is the constant 1, so it
  carries nothing.
- Wide ResNets: ``block1``, ``block2``, ``block3``.
- CIFAR ResNets: ``layer1`` ... ``layer4`` (the residual groups; ZSKT has no ResNet, this is the analogue).

Other models need the layer names given explicitly (ZSKT's ``at_layers``), or ``at_beta = 0``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError
from bench.models import CifarResNet, LeNet5, WideResNet

# the block groups whose outputs ZSKT compares, per architecture family (module names, in forward order)
DEFAULT_LAYERS: dict[type, tuple[str, ...]] = {
    LeNet5: ("relu1", "relu2"),
    WideResNet: ("block1", "block2", "block3"),
    CifarResNet: ("layer1", "layer2", "layer3", "layer4"),
}


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """a(x) = normalise(mean over channels of x^2), flattened: (B, C, H, W) -> (B, H*W), unit L2 norm per row."""
    return F.normalize(x.float().pow(2).mean(dim=1).reshape(x.shape[0], -1), dim=1)


def attention_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """sum over layers of mean((a_s - a_t)^2); the arguments are attention maps (:func:`attention_map`)."""
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(f"attention_loss needs the same non-zero number of student and teacher maps, got "
                         f"{len(student_maps)} and {len(teacher_maps)}")
    for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        if s.shape != t.shape:
            raise ConfigError(f"attention layer {i}: the student's map is {tuple(s.shape)}, the teacher's "
                              f"{tuple(t.shape)}; attention transfer needs layers of equal spatial size (choose "
                              f"matching layers with at_layers, or set at_beta to 0)")
    return torch.stack([(s - t).pow(2).mean() for s, t in zip(student_maps, teacher_maps)]).sum()


def attention_layers(model: nn.Module, names: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The layers whose outputs carry the attention term: ``names`` if given, else the architecture's default."""
    if names:
        return tuple(names)
    for cls, layers in DEFAULT_LAYERS.items():
        if isinstance(model, cls):
            return layers
    raise ConfigError(f"no default attention layers for {type(model).__name__}; name the layers (at_layers, module "
                      f"names shared by teacher and student, e.g. {list(DEFAULT_LAYERS[WideResNet])}) or set "
                      f"at_beta to 0")


class LayerOutputs:
    """Forward hooks that keep the outputs of ``model``'s submodules ``names`` from its last forward pass.

    ``maps()`` turns them into attention maps (in the order of ``names``). Use as a context manager, or
    call :meth:`remove`."""

    def __init__(self, model: nn.Module, names: tuple[str, ...] | list[str], what: str = "model"):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"{what} {type(model).__name__} has no layer named {', '.join(map(repr, missing))}; "
                              f"layers with outputs: {', '.join(n for n in modules if n)}")
        self.names = tuple(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            self.outputs[name] = output

        return hook

    def maps(self) -> list[torch.Tensor]:
        """Attention maps of the recorded outputs, in the order of ``names``."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"no forward pass has reached layer(s) {missing} yet")
        return [attention_map(self.outputs[n]) for n in self.names]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs = {}

    def __enter__(self) -> "LayerOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
