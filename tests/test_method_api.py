"""The method API: registry, plugins, typed configs, and the context's data-access enforcement."""
from pathlib import Path

import pytest
import torch

from bench.config import ConfigError
from bench.method import (DataAccess, DataAccessError, NonFiniteError, PluginError, get_method, list_methods,
                          load_plugin, native_bf16)
from tests.helpers import make_ctx

BUILTINS = {"kd", "kd_noise", "kd_alt", "student_only"}


def _ctx(data, access, tmp_path, few_limit=None, few_labels=False):
    return make_ctx(data, access, tmp_path, few=few_limit, few_labels=few_labels, budget=0.5)


def test_builtins_are_registered():
    assert BUILTINS <= set(list_methods())


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        get_method("dafll")
    assert "unknown method 'dafll'" in str(err.value) and "kd_noise" in str(err.value)


def test_data_free_context_refuses_training_data(digits, tmp_path):
    ctx = _ctx(digits, DataAccess.NONE, tmp_path)
    for call in (ctx.train_data, lambda: ctx.few_samples(1), lambda: next(ctx.train_batches(8)),
                 lambda: ctx.alt_images("mnist_5k")):
        with pytest.raises(DataAccessError, match="data_access='none'"):
            call()
    assert ctx.real_samples_used == 0
    assert ctx.noise(4).shape == (4, 1, 32, 32)


def test_few_context_gives_at_most_n_and_counts(digits, tmp_path):
    ctx = _ctx(digits, DataAccess.FEW, tmp_path, few_limit=20, few_labels=True)
    x, y = ctx.few_samples(20)
    assert x.shape == (20, 1, 32, 32) and x.dtype == torch.uint8 and y is None
    x2, y2 = ctx.few_samples(10, labels=True)
    assert torch.equal(x2, x[:10]) and y2.shape == (10,)
    assert ctx.real_samples_used == 20
    unlabelled = _ctx(digits, DataAccess.FEW, tmp_path, few_limit=20)
    with pytest.raises(DataAccessError, match="did not declare that it reads labels"):
        unlabelled.few_samples(5, labels=True)
    with pytest.raises(DataAccessError, match="more than the declared n_samples=20"):
        ctx.few_samples(21)
    with pytest.raises(DataAccessError):
        ctx.train_data()


def test_alt_context_refuses_the_teachers_own_dataset(digits, tmp_path):
    ctx = _ctx(digits, DataAccess.ALT, tmp_path)
    with pytest.raises(DataAccessError, match="teacher's own source"):
        ctx.alt_images("digits")
    images = ctx.alt_images("mnist_5k")
    assert images.shape[1:] == (1, 32, 32) and images.dtype == torch.uint8
    assert ctx.real_samples_used == 0


def test_full_context_counts_the_training_set(digits, tmp_path):
    ctx = _ctx(digits, DataAccess.FULL, tmp_path)
    x, y = next(ctx.train_batches(16))
    assert x.dtype == torch.float32 and x.shape == (16, 1, 32, 32) and y.shape == (16,)
    assert ctx.real_samples_used == digits.info.train_size


def test_log_writes_the_curve_and_fails_on_nan(digits, tmp_path):
    ctx = _ctx(digits, DataAccess.NONE, tmp_path)
    ctx.log(1, loss=torch.tensor(0.5), lr=0.1)
    with pytest.raises(NonFiniteError, match="loss"):
        ctx.log(2, loss=torch.tensor(float("nan")))
    ctx.close()
    assert (tmp_path / "curve.jsonl").read_text().strip() == '{"step": 1, "loss": 0.5, "lr": 0.1}'


def test_presets_and_overrides_resolve_with_precise_errors():
    kd = get_method("kd")
    preset, cfg = kd.resolve_config("cifar10")
    assert preset == "cifar" and cfg.lr == 0.05 and cfg.milestones == [150, 180, 210] and cfg.batch_size == 64
    _, cfg = kd.resolve_config("fashion_mnist", overrides={"epochs": 3})
    assert cfg.epochs == 3 and cfg.optimizer == "adam"
    with pytest.raises(ConfigError, match="unknown key.*'temprature'.*temperature"):
        kd.resolve_config("fashion_mnist", overrides={"temprature": 3})
    with pytest.raises(ConfigError, match="unknown preset 'imagenet'.*valid presets: cifar, digits, mnist"):
        kd.resolve_config("fashion_mnist", preset="imagenet")
    with pytest.raises(ConfigError, match="milestones"):
        kd.resolve_config("fashion_mnist", overrides={"milestones": [50]})


def test_plugin_file_registers_its_method():
    load_plugin(str(Path(__file__).resolve().parents[1] / "examples" / "my_method.py"))
    assert "uniform_kd" in list_methods()


def test_broken_plugins_fail_clearly(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        load_plugin(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("import no_such_module_xyz\n")
    with pytest.raises(PluginError, match="failed to import: ModuleNotFoundError"):
        load_plugin(str(bad))
    with pytest.raises(PluginError, match="no_such_module_abc"):
        load_plugin("no_such_module_abc")


def test_amp_is_bf16_autocast_only_where_the_device_computes_bf16_natively(digits, tmp_path):
    cpu = torch.device("cpu")
    off = make_ctx(digits, DataAccess.NONE, tmp_path)
    on = make_ctx(digits, DataAccess.NONE, tmp_path, amp=True)
    conv = torch.nn.Conv2d(1, 4, 3)
    x = torch.randn(2, 1, 8, 8)
    with off.autocast():
        assert conv(x).dtype == torch.float32
    assert not off.amp_active
    assert on.amp_active == native_bf16(cpu)  # AVX512-BF16/AMX CPUs (e.g. this project's Zen 4): True
    with on.autocast():
        assert conv(x).dtype == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert native_bf16(torch.device("meta")) is False
