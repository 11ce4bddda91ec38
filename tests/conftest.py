"""Shared test set-up: real data only; an isolated teacher cache per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    # The official MNIST test set beside the checkout is the tests' data root (CI sets the same).
    if "DFKD_DATA_ROOT" not in os.environ and SHARED_DATA.is_dir():
        os.environ["DFKD_DATA_ROOT"] = str(SHARED_DATA)
    # the latency pass times every architecture on eager PyTorch and ONNX Runtime at batch 1 and 64: 0.1 s of runs
    # each instead of 1 s keeps the grid tests quick (they check the columns are filled, not the figures' precision)
    os.environ.setdefault("DFKD_LATENCY_MIN_RUN_TIME", "0.1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A teacher/student cache shared by the tests of one session (not the user's ~/.cache)."""
    path = Path(os.environ.get("DFKD_TEST_CACHE_DIR") or tmp_path_factory.mktemp("cache"))
    return path


@pytest.fixture(scope="session")
def data_root() -> Path | None:
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits (upscaled to 32 px) as a task: training split, validation split, test split."""
    from bench.data import task_data

    return task_data("digits")


@pytest.fixture(scope="session")
def teacher(digits, cache_dir):
    """The smoke grid's digits LeNet-5 teacher (same recipe and seed as tests/test_runner.py: one cache entry)."""
    import torch

    from bench.teachers import get_teacher, recipe_for

    return get_teacher("digits", "lenet5", digits, torch.device("cpu"), seed=0,
                       recipe=recipe_for("digits", {"epochs": 15}), cache_dir=cache_dir)


@pytest.fixture()
def one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a busy 2-core machine they spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
