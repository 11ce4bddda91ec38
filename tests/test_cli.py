"""Bad input at the command line gets one clear line naming the bad value and the choices."""
import pytest
import torch
from click.testing import CliRunner

from bench.cli import main


def _invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args, needle", [
    (("run", "--grid", "nosuchgrid"), "unknown grid 'nosuchgrid'; built-in grids:"),
    (("run", "--grid", "smoke", "--plugin", "does_not_exist.py"), "plugin file 'does_not_exist.py' does not exist"),
    (("run", "--grid", "smoke", "--device", "tpu"), "unknown device 'tpu'; valid: auto, cpu, cuda"),
    (("teachers", "train", "--dataset", "imagenette", "--arch", "lenet5"), "unknown dataset 'imagenette'"),
    (("teachers", "train", "--dataset", "digits", "--arch", "lenet9"), "unknown model 'lenet9'"),
])
def test_bad_input_is_one_clear_error(args, needle, tmp_path):
    result = _invoke(*args, *(("--out", str(tmp_path)) if args[0] == "run" else ()))
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_device_cuda_without_cuda(tmp_path):
    result = _invoke("run", "--grid", "smoke", "--device", "cuda", "--out", str(tmp_path))
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_missing_dataset_offline(tmp_path):
    result = _invoke("teachers", "train", "--dataset", "cifar10", "--arch", "resnet18", "--data-root", str(tmp_path),
                     "--cache-dir", str(tmp_path))
    assert result.exit_code == 2 and "cifar" in result.output.lower()


@pytest.mark.parametrize("what, needle", [("methods", "kd_noise"), ("models", "lenet5_half"),
                                           ("datasets", "fashion_mnist"), ("grids", "smoke")])
def test_list(what, needle):
    result = _invoke("list", what)
    assert result.exit_code == 0 and needle in result.output


def test_every_command_has_help_with_examples():
    for args in (["run"], ["list"], ["teachers"]):
        result = _invoke(*args, "--help")
        assert result.exit_code == 0 and "Examples:" in result.output, args
    assert _invoke("teachers", "train", "--help").exit_code == 0


def test_executor_ray_without_ray_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as on a machine without the extra
    result = _invoke("run", "--grid", "smoke", "--executor", "ray", "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "pip install 'dfkd-bench[ray]'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option, value, needle", [
    ("--cpus-per-cell", "0", "--cpus-per-cell must be > 0, got 0.0"),
    ("--retries", "-1", "--retries must be >= 0, got -1"),
])
def test_bad_ray_options(option, value, needle, tmp_path):
    result = _invoke("run", "--grid", "smoke", "--executor", "ray", option, value, "--out", str(tmp_path))
    assert result.exit_code == 2 and needle in result.output, result.output
