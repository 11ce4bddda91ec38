"""Locality-preserving feature embedding (methods/losses.py, methods/lp_kd.py): the loss by hand, its
invariances and gradients, the config, and a short run on digits."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench.config import ConfigError
from bench.method import DataAccess, TeacherAccess, get_method
from bench.metrics import evaluate_accuracy
from bench.models import create_model
from bench.transforms import to_float
from methods.losses import locality_preserving_loss, locality_weights, squared_distances
from tests.helpers import run_distill

pytestmark = pytest.mark.usefixtures("one_thread")

# four teacher features on a line: squared distances 1 (0-1), 9 (0-2), 49 (0-3), 4 (1-2), 36 (1-3), 16 (2-3)
TEACHER = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
# student features in 2-D: squared distances 1 (0-1), 2 (0-2), 4 (0-3), 1 (1-2), 5 (1-3), 2 (2-3)
STUDENT = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)


def test_weights_by_hand_one_neighbour_symmetrised():
    # k = 1: N(0) = {1}, N(1) = {0}, N(2) = {1} (4 < 9 < 16), N(3) = {2}; symmetrised: edges 0-1, 1-2, 2-3
    alpha = locality_weights(TEACHER, k=1, sigma=2.0)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for (i, j), d in {(0, 1): 1.0, (1, 2): 4.0, (2, 3): 16.0}.items():
        expected[i, j] = expected[j, i] = math.exp(-d / 2.0)
    torch.testing.assert_close(alpha, expected.to(alpha.dtype))


def test_sigma_defaults_to_the_mean_nonzero_teacher_distance():
    sigma = (1 + 9 + 49 + 4 + 36 + 16) / 6
    alpha = locality_weights(TEACHER, k=1)  # sigma <= 0: automatic
    assert alpha[0, 1].item() == pytest.approx(math.exp(-1 / sigma))
    assert alpha[2, 3].item() == pytest.approx(math.exp(-16 / sigma))
    # k is capped at m - 1: every other sample is a neighbour, the diagonal stays 0
    full = locality_weights(TEACHER, k=10)
    assert (full.diagonal() == 0).all() and (full + torch.eye(4) > 0).all()


def test_loss_by_hand_raw_and_scale_invariant():
    a01, a12, a23 = math.exp(-0.5), math.exp(-2.0), math.exp(-8.0)
    # (1/m) sum over ordered pairs: each edge twice; student distances 1 (0-1), 1 (1-2), 2 (2-3)
    raw = 2 * (a01 * 1 + a12 * 1 + a23 * 2) / 4
    got = locality_preserving_loss(STUDENT, TEACHER, k=1, sigma=2.0, scale_invariant=False)
    assert got.item() == pytest.approx(raw, rel=1e-6)
    mean_student = 2 * (1 + 2 + 4 + 1 + 5 + 2) / 12  # mean over the 12 ordered pairs i != j
    scaled = locality_preserving_loss(STUDENT, TEACHER, k=1, sigma=2.0)
    assert scaled.item() == pytest.approx(raw / mean_student, rel=1e-6)


def test_student_reproducing_the_teachers_geometry_gets_the_teachers_own_value_whatever_its_width():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(32, 6, generator=g, dtype=torch.float64)
    alpha = locality_weights(t, k=5)
    own = (alpha * squared_distances(t)).sum() / 32
    q, _ = torch.linalg.qr(torch.randn(10, 6, generator=g, dtype=torch.float64))  # 6 -> 10, orthonormal columns
    s = t @ q.t() + 3.0  # same distances in a wider space, shifted
    assert torch.allclose(squared_distances(s), squared_distances(t), atol=1e-9)
    raw = locality_preserving_loss(s, t, k=5, scale_invariant=False)
    assert raw.item() == pytest.approx(own.item(), rel=1e-6)  # = (1/m) sum alpha_ij D_T[i, j]
    # the scale-invariant form does not change when the student's features are scaled
    assert locality_preserving_loss(5 * s, t, k=5).item() == pytest.approx(locality_preserving_loss(s, t, k=5).item())
    # and neighbourhoods that collapse to points give 0
    assert locality_preserving_loss(torch.zeros(32, 3), t.float(), k=5, scale_invariant=False).item() == 0.0


def test_gradient_flows_into_the_student_features_only():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(16, 8, generator=g, requires_grad=True)
    s = torch.randn(16, 4, generator=g, requires_grad=True)
    loss = locality_preserving_loss(s, t, k=3)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    # a gradient step on the raw loss pulls teacher-neighbours together in the student's space
    s2 = s.detach().clone().requires_grad_(True)
    raw = locality_preserving_loss(s2, t, k=3, scale_invariant=False)
    raw.backward()
    with torch.no_grad():
        after = locality_preserving_loss(s2 - 0.01 * s2.grad, t, k=3, scale_invariant=False)
    assert after < raw


def test_config_and_declared_access():
    method = get_method("lp_kd")
    assert method.data_access is DataAccess.FULL and method.teacher_access is TeacherAccess.FEATURES
    _, cfg = method.resolve_config("fashion_mnist")
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("adam", 1e-3, 256, 10)  # kd's MNIST preset
    assert (cfg.neighbours, cfg.sigma, cfg.lp_weight, cfg.ce_weight, cfg.kd_weight) == (5, 0.0, 0.1, 1.0, 0.0)
    assert cfg.scale_invariant
    for bad, word in [({"neighbours": 0}, "neighbours"), ({"lp_weight": -1}, "lp_weight"), ({"batch_size": 1}, "batch_size")]:
        with pytest.raises(ConfigError, match=word):
            method.resolve_config("digits", overrides=bad)


@pytest.mark.slow
def test_short_lp_kd_run_on_digits_improves_the_student(digits, teacher, tmp_path):
    method = get_method("lp_kd")
    _, cfg = method.resolve_config("digits", overrides={"kd_weight": 0.5})
    torch.manual_seed(0)
    student = create_model("lenet5_half", 10, 1, 32)
    accuracy = lambda m: evaluate_accuracy(m.eval(), digits.test_x, digits.test_y, lambda x: to_float(x, digits.info))
    before = accuracy(student)
    outcome = run_distill(method(cfg), teacher.model, student.train(), digits, tmp_path, budget=0.2)
    after = accuracy(outcome.student)
    assert after >= before + 30, (before, after)
    assert outcome.teacher_queries == outcome.student_steps * cfg.batch_size  # one teacher forward per step
    assert outcome.real_samples_used == digits.train_x.shape[0]
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert all({"ce", "lp", "kd"} <= set(row) for row in curve if "loss" in row)
