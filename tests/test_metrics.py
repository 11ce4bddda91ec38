"""bench.metrics on real (tiny) models."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from bench.metrics import (_timed_copy, count_flops, count_params, evaluate_accuracy, measure_latency, measure_throughput,
                           peak_memory_mb, reset_peak_memory)
from bench.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def test_evaluate_accuracy_identity_classifier_is_100():
    # each "image" is one row with 255 at the label's position: Flatten is a perfect classifier
    y = torch.arange(10).repeat(7)
    x = torch.zeros(len(y), 1, 1, 10, dtype=torch.uint8)
    x[torch.arange(len(y)), 0, 0, y] = 255
    model = nn.Flatten()
    assert evaluate_accuracy(model, x, y, _to_float, batch_size=16) == 100.0


def test_evaluate_accuracy_hand_computed_linear_model():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # predicts argmax of the pixels
    x = torch.tensor([[255, 0], [0, 255], [200, 100], [10, 20], [5, 1]], dtype=torch.uint8)
    y = torch.tensor([0, 1, 1, 1, 1])  # predictions 0, 1, 0, 1, 0 -> 3 of 5 correct
    model.train()
    assert evaluate_accuracy(model, x, y, _to_float, batch_size=2) == pytest.approx(60.0)
    assert model.training  # previous mode restored


def test_evaluate_accuracy_restores_eval_mode_and_rejects_mismatch():
    model = nn.Flatten().eval()
    x = torch.zeros(3, 1, 2, dtype=torch.uint8)
    evaluate_accuracy(model, x, torch.zeros(3, dtype=torch.long), _to_float)
    assert not model.training
    with pytest.raises(ValueError, match="labels"):
        evaluate_accuracy(model, x, torch.zeros(2, dtype=torch.long), _to_float)


def test_count_params_excludes_buffers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4))
    assert count_params(model) == 36 + 8
    assert sum(b.numel() for b in model.buffers()) > 0


def test_count_flops_linear_and_mode_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)).train()
    flops, macs = count_flops(model, (3, 2, 2))
    assert macs == 12 * 5 + 5 * 3
    assert flops == 2 * macs
    assert model.training


def test_measure_latency_positive_and_threads_restored():
    model = create_model("lenet5_half", 10, 1, 32)
    torch.set_num_threads(2)
    threads = torch.get_num_threads()
    median, iqr = measure_latency(model, (1, 32, 32), threads=1, min_run_time=0.05)
    assert math.isfinite(median) and median > 0
    assert math.isfinite(iqr) and iqr >= 0
    assert torch.get_num_threads() == threads
    assert model.training  # the caller's model is untouched (a copy is timed)


def test_onnxruntime_latency_finite_at_batch_1_and_64():
    from bench.metrics import measure_onnxruntime_latency, onnxruntime_missing

    if onnxruntime_missing():
        pytest.skip(f"ONNX Runtime latency not testable: {onnxruntime_missing()}")
    model = create_model("mlp_30", 10, 1, 32)  # a tiny MLP (25K MACs): the test is about the timing, not the model
    one, iqr = measure_onnxruntime_latency(model, (1, 32, 32), threads=1, min_run_time=0.05)
    many, _ = measure_onnxruntime_latency(model, (1, 32, 32), threads=1, min_run_time=0.05, batch=64)
    assert math.isfinite(one) and one > 0 and math.isfinite(iqr) and iqr >= 0
    assert math.isfinite(many) and many > one  # 64 images take longer than one
    assert model.training  # the caller's model is untouched (a copy is exported)
    # the timed graph computes the model: the same logits (the MLP's 32 -> 28 px resize included)
    from bench.metrics import _ort_session

    x = torch.randn(4, 1, 32, 32)
    logits = torch.from_numpy(_ort_session(model, (1, 32, 32), threads=1).run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(logits, model.eval()(x), atol=1e-5)


def test_onnxruntime_latency_without_the_package_says_how_to_install(monkeypatch):
    import importlib.util

    from bench import metrics

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"onnxruntime.*pip install"):
        metrics.measure_onnxruntime_latency(create_model("mlp_30", 10, 1, 32), (1, 32, 32))


def test_timed_copies_use_the_default_memory_format():
    model = create_model("lenet5_half", 10, 1, 32).to(memory_format=torch.channels_last)
    conv_weights = [p for p in model.parameters() if p.dim() == 4]
    assert not all(p.is_contiguous() for p in conv_weights)  # the test is meaningful
    timed = _timed_copy(model, torch.device("cpu"))
    assert all(p.is_contiguous() for p in timed.parameters())
    assert not all(p.is_contiguous() for p in conv_weights)  # the caller's model is untouched


def test_measure_throughput_positive():
    model = create_model("lenet5_half", 10, 1, 32)
    assert measure_throughput(model, (1, 32, 32), batch_size=4, min_run_time=0.05) > 0


def test_peak_memory_cpu():
    reset_peak_memory("cpu")
    assert peak_memory_mb("cpu") > 0
    with pytest.raises(ValueError, match="supported"):
        peak_memory_mb("meta")
