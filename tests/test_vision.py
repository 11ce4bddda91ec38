"""bench._vision: torchvision and timm import (also beside a CPU-only torch with a CUDA torchvision)."""
from __future__ import annotations

import torch

from bench._vision import import_timm, import_torchvision


def test_import_torchvision_models_usable():
    torchvision = import_torchvision()
    assert import_torchvision() is torchvision  # cached
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    # the schemas that torchvision's import-time fake-kernel registrations need exist either way
    assert hasattr(torch.ops.torchvision, "nms")


def test_import_timm_create_model_forward():
    timm = import_timm()
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()
