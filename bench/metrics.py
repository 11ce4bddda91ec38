"""Accuracy, parameter count, FLOPs/MACs, CPU latency, throughput and peak memory.

How each is measured (the report states it):

- Accuracy: top-1 in percent, model in eval mode.
- Params: parameters only; buffers (BatchNorm running statistics) are not counted.
- FLOPs / MACs: ``torch.utils.flop_counter.FlopCounterMode`` on one image. It counts 2 FLOPs per
  multiply-accumulate of convolutions and matrix products (conv, linear, bmm, attention) and nothing
  else: biases, BatchNorm, activations, pooling and element-wise additions are not counted. MACs are
  FLOPs // 2, the unit papers often call "FLOPs" (DAFL's LeNet-5 "436K" are MACs).
- Latency, eager PyTorch: ``torch.utils.benchmark`` on CPU, batch 1 (or N), a fixed thread count, after a
  warm-up; median and inter-quartile range over the timed blocks, in milliseconds per batch.
- Latency, ONNX Runtime: the model exported by :func:`bench.export.write_onnx` (the graph ``bench export``
  writes), run by ONNX Runtime's CPU execution provider with ``threads`` intra-op threads, one inter-op
  thread, sequential execution and all graph optimisations; after a warm-up, blocks of runs are timed with
  ``time.perf_counter`` until ``min_run_time`` has passed; median and IQR over the blocks' per-run times.
- Throughput: images/s at batch N on the given device; ``torch.utils.benchmark`` synchronises CUDA.
- Peak memory, per cell: CUDA allocator peak on CUDA; on CPU (Linux) the peak resident set size since
  :func:`reset_peak_memory` lowered it to the current size (``/proc/self/clear_refs``), NaN where that cannot be reset.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "count_flops",
    "count_params",
    "evaluate_accuracy",
    "measure_latency",
    "measure_onnxruntime_latency",
    "measure_throughput",
    "peak_memory_mb",
    "reset_peak_memory",
]

_WARMUP_RUNS = 10


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once); buffers such as BN running statistics excluded."""
    return sum(p.numel() for p in model.parameters())


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(FLOPs, MACs) of one forward pass on ONE image of shape ``input_shape`` = (C, H, W).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on a batch of 1, in eval mode, without
    gradients, on the model's device. Only convolutions and matrix products are counted (2 FLOPs per
    multiply-accumulate); biases, normalisation, activations and pooling are not. MACs = FLOPs // 2.
    The model's train/eval mode is restored.
    """
    device, dtype = _device_and_dtype(model)
    x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    return flops, flops // 2


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor,
                      to_float: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent of ``model`` on the uint8 images ``x_uint8`` with labels ``y``.

    ``x_uint8`` and ``y`` are already on the model's device; ``to_float`` turns a uint8 batch into the
    normalised model input. The model is evaluated in eval mode; its previous mode is restored.
    """
    n = int(y.shape[0])
    if n == 0 or x_uint8.shape[0] != n:
        raise ValueError(f"evaluate_accuracy needs as many images as labels (> 0), got {x_uint8.shape[0]} "
                         f"images and {n} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        correct = torch.zeros((), dtype=torch.long, device=y.device)
        for start in range(0, n, batch_size):
            logits = model(to_float(x_uint8[start:start + batch_size]))
            correct += (logits.argmax(dim=1) == y[start:start + batch_size]).sum()
    finally:
        model.train(was_training)
    return 100.0 * int(correct.item()) / n


def _timed_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of ``model`` on ``device`` in eval mode, in the default memory format (so a method's
    training-time layout, e.g. channels_last, does not change the timings); the caller's model is untouched."""
    return copy.deepcopy(model).to(device).to(memory_format=torch.contiguous_format).eval()


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, threads: int = 1,
                    min_run_time: float = 0.5, batch: int = 1) -> tuple[float, float]:
    """Eager-PyTorch CPU latency of one batch of ``batch`` images in milliseconds: (median, inter-quartile range).

    A deep copy of the model on the CPU in eval mode, without gradients, with ``threads`` intra-op
    threads, is warmed up and then timed by ``torch.utils.benchmark.Timer.blocked_autorange``; the
    statistics are over its timed blocks. torch's thread count is restored afterwards.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    cpu_model = _timed_copy(model, torch.device("cpu"))
    _, dtype = _device_and_dtype(cpu_model)
    x = torch.randn(batch, *input_shape, dtype=dtype)
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.no_grad():
            for _ in range(_WARMUP_RUNS):
                cpu_model(x)
            timer = Timer(stmt="model(x)", globals={"model": cpu_model, "x": x}, num_threads=threads)
            measurement = timer.blocked_autorange(min_run_time=min_run_time)
    finally:
        torch.set_num_threads(previous_threads)
    return measurement.median * 1e3, measurement.iqr * 1e3


_BLOCK_SECONDS = 0.01  # ONNX Runtime timing: runs per block are chosen so that a block lasts about this long


def onnxruntime_missing() -> str:
    """Why ONNX Runtime latency cannot be measured here ('' when it can): the ``onnx`` exporter and ``onnxruntime``."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if not missing:
        return ""
    return (f"the {' and '.join(missing)} package(s) are not installed "
            "(pip install onnx onnxruntime -c constraints.txt, or pip install 'dfkd-bench[export]')")


def _ort_session(model: nn.Module, input_shape: tuple[int, ...], threads: int):
    import tempfile
    from pathlib import Path

    import onnxruntime

    from bench.export import write_onnx

    cpu_model = _timed_copy(model, torch.device("cpu"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory(prefix="dfkd-ort-") as folder:
        path = Path(folder) / "model.onnx"
        write_onnx(cpu_model, torch.zeros(2, *input_shape), path)
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure_onnxruntime_latency(model: nn.Module, input_shape: tuple[int, ...], *, threads: int = 1,
                                min_run_time: float = 0.5, batch: int = 1) -> tuple[float, float]:
    """ONNX Runtime CPU latency of one batch of ``batch`` images in milliseconds: (median, inter-quartile range).

    The model (a deep copy, eval mode) is exported by :func:`bench.export.write_onnx` and run by the CPU execution
    provider with ``threads`` intra-op threads; after a warm-up, blocks of runs (each about 10 ms) are timed until
    ``min_run_time`` seconds have passed; the statistics are over the blocks' per-run times.

    Raises:
        RuntimeError: onnx or onnxruntime is not installed (the message says how to install them).
    """
    import time

    if threads < 1 or batch < 1:
        raise ValueError(f"threads and batch must be >= 1, got threads={threads}, batch={batch}")
    missing = onnxruntime_missing()
    if missing:
        raise RuntimeError(f"ONNX Runtime latency: {missing}")
    session = _ort_session(model, input_shape, threads)
    feed = {"input": torch.randn(batch, *input_shape).numpy()}
    start = time.perf_counter()
    for _ in range(_WARMUP_RUNS):
        session.run(None, feed)
    per_block = max(1, int(_BLOCK_SECONDS / max((time.perf_counter() - start) / _WARMUP_RUNS, 1e-7)))
    times: list[float] = []
    deadline = time.perf_counter() + min_run_time
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        for _ in range(per_block):
            session.run(None, feed)
        times.append((time.perf_counter() - t0) / per_block)
    q1, median, q3 = (float(v) for v in torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
    return median * 1e3, (q3 - q1) * 1e3


def measure_throughput(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 256,
                       device: str | torch.device = "cpu", min_run_time: float = 0.5) -> float:
    """Inference throughput in images/s at ``batch_size`` on ``device`` (eval mode, no gradients).

    Timed on a deep copy of the model by ``torch.utils.benchmark.Timer.blocked_autorange``, which
    synchronises CUDA around each timed block; the median block time is used. On CPU, torch's current
    thread count is used.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    timed_model = _timed_copy(model, device)
    _, dtype = _device_and_dtype(timed_model)
    x = torch.randn(batch_size, *input_shape, device=device, dtype=dtype)
    with torch.no_grad():
        timed_model(x)  # warm-up
        timer = Timer(stmt="model(x)", globals={"model": timed_model, "x": x},
                      num_threads=torch.get_num_threads())
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return batch_size / measurement.median


def _cuda_peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20


_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"
_cpu_reset_ok = False


def _cpu_peak_mb(device: torch.device) -> float:
    """VmHWM (the peak resident set size) in MiB, if it was reset for this measurement; else NaN."""
    if not _cpu_reset_ok:
        return math.nan
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return math.nan


def _cuda_reset(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def _cpu_reset(device: torch.device) -> None:
    """Lower the process's peak RSS to its current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    global _cpu_reset_ok
    try:
        with open(_PROC_CLEAR_REFS, "w") as f:
            f.write("5")
        _cpu_reset_ok = True
    except OSError:
        _cpu_reset_ok = False


_PEAK: dict[str, Callable[[torch.device], float]] = {"cuda": _cuda_peak_mb, "cpu": _cpu_peak_mb}
_RESET: dict[str, Callable[[torch.device], None]] = {"cuda": _cuda_reset, "cpu": _cpu_reset}


def _lookup(table: dict[str, Callable], device: str | torch.device) -> tuple[Callable, torch.device]:
    device = torch.device(device)
    if device.type not in table:
        raise ValueError(f"peak memory is not measured on device type {device.type!r}; supported: {sorted(table)}")
    return table[device.type], device


def peak_memory_mb(device: str | torch.device) -> float:
    """Peak memory in MiB since the last :func:`reset_peak_memory`.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors allocated by torch on that device). CPU: the
    process's peak resident set size since the reset (Linux); NaN where the peak cannot be reset.
    """
    fn, device = _lookup(_PEAK, device)
    return fn(device)


def reset_peak_memory(device: str | torch.device) -> None:
    """Reset the peak that :func:`peak_memory_mb` reports (CUDA allocator; CPU RSS peak on Linux)."""
    fn, device = _lookup(_RESET, device)
    fn(device)
