"""Conditional-adversarial KD (methods/cgan_kd.py): the discriminator, its and the student's losses, the
config, and a short run on digits (the discriminator tracked for checkpoints, never part of the student)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError
from bench.method import DataAccess, TeacherAccess, get_method
from bench.metrics import count_params, evaluate_accuracy
from bench.models import create_model
from bench.monitor import CHECKPOINT_FILE
from bench.transforms import to_float
from methods.cgan_kd import LogitDiscriminator, discriminator_loss, student_adversarial_loss
from tests.helpers import run_distill

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("conditioning, width, aux", [("label_concat", 20, False), ("aux_classifier", 10, True),
                                                     ("none", 10, False)])
def test_discriminator_shape(conditioning, width, aux):
    d = LogitDiscriminator(10, conditioning)
    linears = [m for m in d.trunk if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(width, 256), (256, 256)]
    assert all(m.negative_slope == 0.2 for m in d.trunk if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    assert (d.adv.in_features, d.adv.out_features) == (256, 1)
    assert (d.aux is not None) == aux
    score, cls = d(torch.randn(5, 10), torch.arange(5))
    assert score.shape == (5,) and (cls.shape == (5, 10) if aux else cls is None)


def test_label_concat_conditions_on_the_class():
    torch.manual_seed(0)
    d = LogitDiscriminator(10, "label_concat")
    z = torch.randn(4, 10)
    assert not torch.allclose(d(z, torch.zeros(4, dtype=torch.long))[0], d(z, torch.ones(4, dtype=torch.long))[0])


@pytest.mark.parametrize("conditioning", ["label_concat", "none"])
def test_discriminator_and_student_pull_the_same_logits_in_opposite_directions(conditioning):
    torch.manual_seed(0)
    d = LogitDiscriminator(10, conditioning)
    y = torch.randint(0, 10, (8,))
    teacher_logits = torch.randn(8, 10)
    s = torch.randn(8, 10, requires_grad=True)
    g_disc, = torch.autograd.grad(discriminator_loss(d, teacher_logits, s, y), s)  # D wants these called fake
    g_student, = torch.autograd.grad(student_adversarial_loss(d, s, y), s)  # the student wants them called real
    cosine = F.cosine_similarity(g_disc, g_student, dim=1)
    torch.testing.assert_close(cosine, -torch.ones(8), atol=1e-5, rtol=0)
    # and the loss values: D's fake term -log(1 - D) against the student's -log D
    score, _ = d(s.detach(), y)
    torch.testing.assert_close(student_adversarial_loss(d, s.detach(), y), F.softplus(-score).mean())


def test_aux_classifier_adds_the_class_terms():
    torch.manual_seed(0)
    d = LogitDiscriminator(10, "aux_classifier")
    y, t, s = torch.randint(0, 10, (6,)), torch.randn(6, 10), torch.randn(6, 10)
    (rs, rc), (fs, fc) = d(t, y), d(s, y)
    expected = F.softplus(-rs).mean() + F.softplus(fs).mean() + F.cross_entropy(rc, y) + F.cross_entropy(fc, y)
    torch.testing.assert_close(discriminator_loss(d, t, s, y), expected)
    torch.testing.assert_close(student_adversarial_loss(d, s, y), F.softplus(-fs).mean() + F.cross_entropy(fc, y))


def test_config_and_declared_access():
    method = get_method("cgan_kd")
    assert method.data_access is DataAccess.FULL and method.teacher_access is TeacherAccess.OUTPUTS
    _, cfg = method.resolve_config("mnist")
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("adam", 1e-3, 256, 10)  # kd's MNIST preset
    assert (cfg.conditioning, cfg.disc_hidden, cfg.disc_lr, cfg.adv_weight, cfg.l1_weight, cfg.ce_weight) == \
        ("label_concat", 256, 2e-4, 1.0, 1.0, 1.0)
    assert method.resolve_config("cifar10")[1].optimizer == "sgd"
    with pytest.raises(ConfigError) as err:
        method.resolve_config("digits", overrides={"conditioning": "projection"})
    assert "'projection'" in str(err.value) and "label_concat, aux_classifier, none" in str(err.value)


@pytest.mark.slow
def test_short_cgan_kd_run_on_digits_improves_the_student_and_keeps_the_discriminator_out(digits, teacher, tmp_path):
    method = get_method("cgan_kd")
    _, cfg = method.resolve_config("digits")
    torch.manual_seed(0)
    student = create_model("lenet5_half", 10, 1, 32)
    params = count_params(student)
    accuracy = lambda m: evaluate_accuracy(m.eval(), digits.test_x, digits.test_y, lambda x: to_float(x, digits.info))
    before = accuracy(student)
    # checkpoint at every step: the last checkpoint shows what a resume would restore
    outcome = run_distill(method(cfg), teacher.model, student.train(), digits, tmp_path, budget=0.2,
                          checkpoint_every=1e-9)
    after = accuracy(outcome.student)
    assert after >= before + 30, (before, after)
    assert outcome.student is student and count_params(outcome.student) == params
    assert not any(isinstance(m, LogitDiscriminator) for m in outcome.student.modules())
    assert outcome.teacher_queries == outcome.student_steps * cfg.batch_size
    states = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["states"]
    assert {"discriminator", "discriminator_optimizer", "student"} <= set(states)
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert all({"adv", "l1", "ce", "loss_d"} <= set(row) for row in curve if "loss" in row)
