"""bench.models: every zoo model builds, has the Classifier interface, and the papers' sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from bench.metrics import count_flops, count_params
from bench.models import Classifier, create_model, features_and_logits, list_models, register_model


pytestmark = pytest.mark.usefixtures("one_thread")


BUILTIN = ["lenet5", "lenet5_half", "lenet5_quarter", "lenet5_double", "lenet5_triple", "mlp_1200", "mlp_800", "mlp_100", "mlp_30",
           "resnet8", "resnet8_w4", "resnet8_w8", "resnet14", "resnet14_w8", "resnet20", "resnet18", "resnet34", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
           "vgg11", "vgg13", "vgg16", "vgg11_bn", "vgg13_bn", "vgg16_bn"]


def test_builtin_models_registered():
    assert set(BUILTIN) <= set(list_models())


@pytest.mark.parametrize("num_classes,in_channels", [(10, 1), (100, 3)])
@pytest.mark.parametrize("name", list_models())
def test_model_interface(name, num_classes, in_channels):
    torch.manual_seed(0)
    model = create_model(name, num_classes, in_channels, 32).eval()
    assert isinstance(model, Classifier)
    x = torch.randn(2, in_channels, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features, logits2 = features_and_logits(model, x)
    assert logits.shape == (2, num_classes)
    assert features.shape == (2, model.feature_dim)
    assert torch.equal(logits, model.forward_head(features))
    assert torch.equal(logits, logits2)


def _conv_macs(c_in: int, c_out: int, k: int, out_hw: int) -> int:
    return c_out * out_hw * out_hw * c_in * k * k


def test_lenet5_params_and_macs_match_dafl():
    """DAFL Table 1: LeNet-5 ~62K params, ~436K FLOPs (multiply-accumulates)."""
    model = create_model("lenet5", 10, 1, 32)
    assert count_params(model) == 61706
    expected = (_conv_macs(1, 6, 5, 28) + _conv_macs(6, 16, 5, 10) + _conv_macs(16, 120, 5, 1)
                + 120 * 84 + 84 * 10)
    assert expected == 416_520
    flops, macs = count_flops(model, (1, 32, 32))
    assert (flops, macs) == (2 * expected, expected)


def test_lenet5_half_params_and_macs_match_dafl():
    """DAFL Table 1: LeNet-5-half ~16K params, ~144K FLOPs."""
    model = create_model("lenet5_half", 10, 1, 32)
    assert count_params(model) == 15738
    expected = (_conv_macs(1, 3, 5, 28) + _conv_macs(3, 8, 5, 10) + _conv_macs(8, 60, 5, 1)
                + 60 * 42 + 42 * 10)
    assert expected == 133_740
    assert count_flops(model, (1, 32, 32))[1] == expected


@pytest.mark.parametrize("name, widths", [("lenet5_quarter", (2, 4, 30, 21)), ("lenet5_double", (12, 32, 240, 168)),
                                          ("lenet5_triple", (18, 48, 360, 252))])
def test_lenet5_ladder_widths_params_and_macs(name, widths):
    """The harness's student ladder: LeNet-5 at a quarter (rounded up), twice and three times its widths."""
    c1, c2, c3, h = widths
    model = create_model(name, 10, 1, 32)
    assert (model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels, model.fc1.out_features) == widths
    assert model.feature_dim == c3
    params = (25 * c1 + c1) + (25 * c1 * c2 + c2) + (25 * c2 * c3 + c3) + (c3 * h + h) + (h * 10 + 10)
    assert count_params(model) == params
    macs = _conv_macs(1, c1, 5, 28) + _conv_macs(c1, c2, 5, 10) + _conv_macs(c2, c3, 5, 1) + c3 * h + h * 10
    assert count_flops(model, (1, 32, 32))[1] == macs
    ladder = ("lenet5_quarter", "lenet5_half", "lenet5", "lenet5_double", "lenet5_triple")
    sizes = [count_params(create_model(n, 10, 1, 32)) for n in ladder]
    assert sizes == sorted(sizes) and sizes[0] == 4_157 and sizes[3] == 244_362 and sizes[-1] == 547_978


def test_lenet5_layers_walkable_and_hooks_see_preactivation():
    model = create_model("lenet5", 10, 1, 32).eval()
    for attr in ["conv1", "conv2", "conv3", "fc1", "fc2", "relu1", "relu2", "relu3", "relu4", "maxpool1", "maxpool2"]:
        assert isinstance(getattr(model, attr), nn.Module), attr
    seen = []
    model.conv3.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        features = model.forward_features(torch.randn(4, 1, 32, 32))
    assert (seen[0] < 0).any()  # the ReLU did not overwrite the conv output in place
    assert torch.equal(features, seen[0].clamp_min(0).flatten(1))


@pytest.mark.parametrize("name,known", [
    ("resnet18", 11_173_962),  # CIFAR ResNet-18, 10 classes
    ("wrn_40_2", 2_243_546),   # ~2.2M (RepDistiller)
    ("wrn_16_1", 175_066),     # ~0.18M
    ("vgg16", 14_728_266),     # CIFAR VGG-16 (Li et al. 2017: 1.5e7)
])
def test_known_param_counts(name, known):
    n = count_params(create_model(name, 10, 3, 32))
    assert abs(n - known) / known < 0.02, (name, n)


def test_vgg_conv_stack_is_sequential_of_plain_layers():
    for name, has_bn in [("vgg16", False), ("vgg16_bn", True)]:
        model = create_model(name, 10, 3, 32)
        kinds = {type(m) for m in model.features}
        assert kinds <= {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d}
        assert (nn.BatchNorm2d in kinds) == has_bn
        assert sum(isinstance(m, nn.Conv2d) for m in model.features) == 13
        assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 512


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_model("resnet99", 10, 3, 32)
    message = str(info.value)
    assert "resnet99" in message
    for name in ["lenet5", "resnet18", "wrn_40_2", "vgg16_bn", "timm:<name>", "torchvision:<name>"]:
        assert name in message


@pytest.mark.parametrize("name,size", [("lenet5", 28), ("lenet5_half", 64), ("vgg16", 16)])
def test_impossible_image_size(name, size):
    with pytest.raises(ValueError, match=str(size)):
        create_model(name, 10, 1, size)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("lenet5", 0, 1, 32)
    with pytest.raises(ValueError, match="the name is taken"):
        register_model("lenet5")(lambda num_classes, in_channels, image_size: None)


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_third_party_models_one_channel(name):
    model = create_model(name, 10, 1, 32).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        features, logits = features_and_logits(model, x)
        assert torch.equal(model(x), logits)
    assert logits.shape == (1, 10)
    assert features.shape == (1, model.feature_dim)


def test_third_party_unknown_names():
    with pytest.raises(ValueError, match="not supported"):
        create_model("torchvision:alexnet", 10, 3, 32)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("timm:no_such_model", 10, 3, 32)


@pytest.mark.parametrize("name, hidden", [("mlp_1200", 1200), ("mlp_800", 800)])
def test_hintonnets_are_dafls_784_h_h_10(name, hidden):
    model = create_model(name, 10, 1, 32)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, hidden), (hidden, hidden), (hidden, 10)]
    assert count_params(model) == 784 * hidden + hidden + hidden * hidden + hidden + hidden * 10 + 10
    # the 32-px input of the harness is resized to 28 px inside the model; a 28-px image passes as it is
    x28 = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x28), model.forward_head(model.forward_features(x28)))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, depth, width", [("resnet8_w4", 8, 4), ("resnet14_w8", 14, 8), ("resnet20", 20, 16)])
def test_thin_resnets_have_6n_plus_2_layers(name, depth, width):
    model = create_model(name, 10, 1, 32)
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                and not (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))]  # 1x1 shortcuts are not counted
    assert len(weighted) == depth and model.conv1.out_channels == width and model.feature_dim == 4 * width
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_thin_resnet_depth_must_be_6n_plus_2():
    from bench.models import ThinResNetSpec

    with pytest.raises(ValueError, match="6n\\+2"):
        ThinResNetSpec(10)


def test_model_card_shows_params_macs_and_batchnorm():
    from bench.models import model_card

    card = model_card("mlp_800")
    assert card.params == 1_276_810 and card.macs == 784 * 800 + 800 * 800 + 800 * 10 and not card.batch_norm
    assert model_card("resnet8_w8").batch_norm and model_card("lenet5").macs == 416_520
