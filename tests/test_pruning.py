"""Students pruned from the teacher (bench/pruning.py): shapes, kept weights, criteria, cache, errors.

Teachers here are freshly initialised zoo models (BN statistics and scales randomised so that they
look trained): pruning only reads weights, so no training is needed to check the bookkeeping.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bench.pruning
from bench.config import ConfigError
from bench.data import DatasetInfo
from bench.metrics import count_flops, count_params
from bench.models import create_model
from bench.pruning import PruningError, build_pruned, cache_folder
from bench.students import StudentContext, build_student, check_spec, rebuild_student

CPU = torch.device("cpu")


def _info(channels: int) -> DatasetInfo:
    return DatasetInfo(name="synthetic", num_classes=10, channels=channels, image_size=32, mean=(0.5,) * channels,
                       std=(0.25,) * channels, train_size=100, augment="none")


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm distinct, non-trivial statistics and scales (as a trained net has)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.1)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    return model


def make_teacher(arch: str, channels: int, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model(arch, 10, channels, 32)
    return randomise_bn(model, seed).eval()


def example(channels: int) -> torch.Tensor:
    return torch.zeros(1, channels, 32, 32)


def test_lenet5_l1_half_has_the_expected_shapes_and_the_teachers_surviving_weights():
    teacher = make_teacher("lenet5", 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, lineage = build_pruned(teacher, "pruned:l1:0.5", example(1), teacher_key="tkey", teacher_arch="lenet5")

    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is untouched
    assert [student.conv1.out_channels, student.conv2.out_channels, student.conv3.out_channels] == [3, 8, 60]
    assert (student.fc1.in_features, student.fc1.out_features) == (60, 42)
    assert (student.fc2.in_features, student.fc2.out_features) == (42, 10)  # the classes are never pruned
    assert count_params(student) == 15_738 < count_params(teacher) == 61_706  # = LeNet-5-half's count
    assert count_flops(student, (1, 32, 32))[1] < count_flops(teacher, (1, 32, 32))[1]
    assert student.feature_dim == 60
    assert lineage.spec == "pruned:l1:0.5" and lineage.teacher_key == "tkey" and lineage.history
    assert not hasattr(student, "kept_channels")  # the lineage travels beside the module, not on it

    kept = {name: list(channels) for name, channels in lineage.kept_channels.items()}
    assert set(kept) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    for name, channels in kept.items():
        layer = getattr(student, name)
        width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        assert len(channels) == width and channels == sorted(set(channels))
    assert kept["fc2"] == list(range(10))

    # The surviving weights are the teacher's at the kept (output, input) indices.
    k1, k2, k3, k4 = (torch.tensor(kept[n]) for n in ("conv1", "conv2", "conv3", "fc1"))
    expected = {
        "conv1": (teacher.conv1.weight[k1], teacher.conv1.bias[k1]),
        "conv2": (teacher.conv2.weight[k2][:, k1], teacher.conv2.bias[k2]),
        "conv3": (teacher.conv3.weight[k3][:, k2], teacher.conv3.bias[k3]),
        "fc1": (teacher.fc1.weight[k4][:, k3], teacher.fc1.bias[k4]),
        "fc2": (teacher.fc2.weight[:, k4], teacher.fc2.bias),
    }
    for name, (w, b) in expected.items():
        layer = getattr(student, name)
        assert torch.equal(layer.weight, w) and torch.equal(layer.bias, b), name

    # L1 criterion (Li et al. 2017), per layer: every kept filter has at least the L1 norm of every removed one.
    for name in ("conv1", "conv2", "conv3", "fc1"):
        norms = getattr(teacher, name).weight.detach().flatten(1).abs().sum(1)
        mask = torch.zeros(norms.numel(), dtype=torch.bool)
        mask[kept[name]] = True
        assert mask.sum() == norms.numel() - int(norms.numel() * 0.5)
        assert norms[mask].min() >= norms[~mask].max(), name


def test_vgg_bn_slimming_keeps_the_largest_bn_scales_globally_and_the_teachers_weights():
    teacher = make_teacher("vgg11_bn", 3, seed=1)
    student, lineage = build_pruned(teacher, "pruned:slim:0.5", example(3))
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    convs = [n for n, m in student.named_modules() if isinstance(m, nn.Conv2d)]
    assert count_params(student) < count_params(teacher)

    kept_scales, removed_scales, total, removed = [], [], 0, 0
    prev = torch.arange(3)  # the image channels
    for conv in convs:
        bn = conv.rsplit(".", 1)[0] + "." + str(int(conv.rsplit(".", 1)[1]) + 1)  # features.k -> features.k+1
        kept = torch.tensor(lineage.kept_channels[conv])
        assert torch.equal(s_mods[conv].weight, t_mods[conv].weight[kept][:, prev])
        assert torch.equal(s_mods[conv].bias, t_mods[conv].bias[kept])
        for field in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(s_mods[bn], field), getattr(t_mods[bn], field)[kept]), (bn, field)
        gamma = t_mods[bn].weight.detach().abs()
        mask = torch.zeros(gamma.numel(), dtype=torch.bool)
        mask[kept] = True
        assert mask.sum() >= 0.1 * gamma.numel()  # at most 90% of one layer is removed
        kept_scales.append(gamma[mask])
        removed_scales.append(gamma[~mask])
        total, removed = total + gamma.numel(), removed + int((~mask).sum())
        prev = kept
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, prev])
    # One global threshold on |gamma| over all layers (network slimming, Liu et al. 2017).
    assert torch.cat(kept_scales).min() >= torch.cat(removed_scales).max()
    assert abs(removed - 0.5 * total) <= len(convs)


@pytest.mark.parametrize("arch, channels, spec", [("lenet5", 1, "pruned:l1:0.5"), ("resnet18", 3, "pruned:slim:0.3")])
def test_cached_student_round_trips_with_identical_outputs(tmp_path, monkeypatch, arch, channels, spec):
    teacher = make_teacher(arch, channels)
    ctx = StudentContext(teacher=teacher, teacher_key=f"{arch}-key", teacher_arch=arch, info=_info(channels),
                         cache_dir=tmp_path, device=CPU)
    built_student = build_student(spec, ctx)
    built = built_student.model.eval()
    folder = cache_folder(ctx, spec)
    assert (folder / "model.pt").is_file() and (folder / "arch.json").is_file()
    state = torch.load(folder / "model.pt", weights_only=True)  # a plain state dict: no unsafe unpickling needed
    assert set(state) == set(built.state_dict())
    assert json.loads((folder / "arch.json").read_text())["params"] == count_params(built)

    def no_pruning(*args, **kwargs):
        raise AssertionError("the second build must load the cached student, not prune again")

    monkeypatch.setattr(bench.pruning, "build_pruned", no_pruning)
    loaded_student = build_student(spec, ctx)
    loaded = loaded_student.model.eval()
    assert loaded is not built
    assert loaded_student.lineage == built_student.lineage and loaded_student.lineage.spec == spec
    assert loaded_student.lineage.teacher_key == f"{arch}-key" and loaded.feature_dim == built.feature_dim
    # the architecture alone (no teacher weights) rebuilds from the lineage: what `bench evaluate` does
    rebuilt = rebuild_student(built_student.record(spec, _info(channels)))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    x = torch.randn(4, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), built(x))
    assert count_params(built) < count_params(teacher)
    if arch == "resnet18":
        # The stem, the second conv of every block and the projection shortcuts feed one residual stream per
        # stage: they are pruned together and keep the same teacher channels.
        kept = {k: list(v) for k, v in built_student.lineage.kept_channels.items()}
        assert len(kept["conv1"]) < 64 and kept["conv1"] == kept["layer1.0.conv2"] == kept["layer1.1.conv2"]
        for stage in (2, 3, 4):
            assert kept[f"layer{stage}.0.shortcut.0"] == kept[f"layer{stage}.0.conv2"] == kept[f"layer{stage}.1.conv2"]
        assert kept["linear"] == list(range(10))


@pytest.mark.parametrize("spec, words", [
    ("pruned:foo:0.5", ["'pruned:foo:0.5'", "l1, slim"]),
    ("pruned:l1:1.5", ["1.5", "strictly between 0 and 1"]),
    ("pruned:l1:0", ["ratio 0.0", "strictly between 0 and 1"]),
    ("pruned:l1:half", ["'half' is not a number"]),
    ("pruned:l1", ["'pruned:l1'", "pruned:<criterion>:<ratio>"]),
])
def test_bad_specs_are_refused_naming_the_bad_value(spec, words):
    with pytest.raises(ConfigError) as err:  # the grid validates student specs on load
        check_spec(spec, "grid.yaml: pairs[1].student")
    for word in words:
        assert word in str(err.value)
    with pytest.raises(ValueError) as err:
        build_pruned(make_teacher("lenet5", 1), spec, example(1))
    assert words[0] in str(err.value)


def test_slimming_needs_batchnorm(tmp_path):
    ctx = StudentContext(teacher=make_teacher("lenet5", 1), teacher_key="k", teacher_arch="lenet5", info=_info(1),
                         cache_dir=tmp_path, device=CPU)
    with pytest.raises(PruningError) as err:
        build_student("pruned:slim:0.5", ctx)
    assert "pruned:slim:0.5" in str(err.value) and "no BatchNorm" in str(err.value) and "pruned:l1:0.5" in str(err.value)
    assert not cache_folder(ctx, "pruned:slim:0.5").exists()


def test_pruning_that_removes_nothing_is_an_error():
    # An untrained BN net has every scale equal to 1: a global |gamma| threshold cannot rank the channels,
    # and torch-pruning then removes none. That must not pass silently as a "pruned" student.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        flat = create_model("vgg11_bn", 10, 3, 32).eval()
    with pytest.raises(PruningError, match=r"pruned:slim:0\.5.*removed no channel"):
        build_pruned(flat, "pruned:slim:0.5", example(3))
