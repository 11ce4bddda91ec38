"""DAFL (methods/dafl.py, methods/generator.py): generator, losses by hand, presets, data access, a short run."""
import json
import math

import pytest
import torch
from torch import nn

from bench.config import ConfigError
from bench.transforms import to_float
from bench.method import CountingTeacher, DataAccess, DataAccessError, get_method
from tests.helpers import make_ctx, run_distill
from bench.metrics import evaluate_accuracy
from bench.models import create_model
from bench.training import schedule
from methods.dafl import activation_loss, dafl_step, information_entropy_loss, one_hot_loss, student_loss
from methods.generator import DAFLGenerator

CPU = torch.device("cpu")


def _accuracy(model, data):
    return evaluate_accuracy(model, data.test_x, data.test_y, lambda xb: to_float(xb, data.info))


# ---------------------------------------------------------------------------------------------
# generator


@pytest.mark.parametrize("latent, channels, width", [(100, 1, 128), (1000, 3, 128), (100, 1, 32)])
def test_generator_output_shape(latent, channels, width):
    torch.manual_seed(0)
    g = DAFLGenerator(latent, 32, channels, width)
    z = g.sample_latent(6)
    assert z.shape == (6, latent)
    x = g(z)
    assert x.shape == (6, channels, 32, 32)
    assert g.l1.in_features == latent and g.l1.out_features == width * 8 * 8
    assert g.conv1.out_channels == width and g.conv2.out_channels == width // 2 and g.conv3.out_channels == channels


def test_generator_batchnorm_settings_follow_the_official_code():
    g = DAFLGenerator(100, 32, 1)  # paper width 128
    # BatchNorm2d(128, 0.8): the 0.8 is eps; momentum stays torch's default 0.1.
    assert (g.bn1.num_features, g.bn1.eps, g.bn1.momentum) == (128, 0.8, 0.1)
    assert (g.bn2.num_features, g.bn2.eps, g.bn2.momentum) == (64, 0.8, 0.1)
    assert (g.bn0.num_features, g.bn0.eps) == (128, 1e-5) and g.bn0.affine
    assert g.bn_out.num_features == 1 and not g.bn_out.affine and g.bn_out.weight is None and g.bn_out.bias is None
    assert isinstance(g.act, nn.LeakyReLU) and g.act.negative_slope == 0.2


def test_generator_stays_in_train_mode_and_normalises_its_output():
    torch.manual_seed(0)
    g = DAFLGenerator(100, 32, 3, 32)
    g.eval()
    assert g.training and all(m.training for m in g.modules())
    x = g(g.sample_latent(64))
    # The affine-free output BN uses the batch statistics: each channel has mean 0 and variance ~1
    # (var / (var + 1e-5) of the tanh output).
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(var, torch.ones(3), atol=1e-2)
    # Running statistics are never used: a second batch is normalised by its own statistics too.
    assert torch.allclose(g(g.sample_latent(64) * 5).mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    # Opting out of the behaviour allows eval mode.
    h = DAFLGenerator(100, 32, 1, 32, always_train=False).eval()
    assert not h.training and not h.bn1.training


def test_generator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 4, got 30"):
        DAFLGenerator(100, 30, 1)
    with pytest.raises(ValueError, match="width must be an even integer >= 2, got 33"):
        DAFLGenerator(100, 32, 1, 33)


# ---------------------------------------------------------------------------------------------
# losses, against values computed by hand


def test_one_hot_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    # argmax: class 0 and class 2; CE = log(sum exp) - chosen logit, averaged over the batch
    row0 = math.log(math.exp(2) + 1 + 1) - 2
    row1 = math.log(1 + math.exp(1) + math.exp(3)) - 3
    assert one_hot_loss(logits).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_activation_loss_by_hand():
    features = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    # -mean |f| over batch and features: -(1 + 2 + 3 + 0) / 4
    assert activation_loss(features).item() == pytest.approx(-1.5, rel=1e-6)


def test_information_entropy_loss_by_hand_uses_log10():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # softmax rows: (1/2, 1/2) and (3/4, 1/4); batch mean pbar = (5/8, 3/8)
    expected = 0.625 * math.log10(0.625) + 0.375 * math.log10(0.375)
    assert information_entropy_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    # its minimum, a uniform batch mean over K classes, is -log10 K (log10, not ln)
    assert information_entropy_loss(torch.zeros(4, 10)).item() == pytest.approx(-1.0, rel=1e-6)
    assert information_entropy_loss(torch.eye(5) * 3).item() == pytest.approx(-math.log10(5), rel=1e-6)


def test_information_entropy_loss_stays_finite_when_a_class_probability_underflows():
    logits = torch.tensor([[200.0, 0.0], [200.0, 0.0]], requires_grad=True)
    # pbar = (1, e^-200): the official (p * log10 p).sum() gives NaN here (0 * -inf); the limit is 0.
    value = information_entropy_loss(logits)
    value.backward()
    assert math.isfinite(value.item()) and abs(value.item()) < 1e-10
    assert torch.isfinite(logits.grad).all()


def test_student_loss_is_kl_at_temperature_one_summed_over_classes_and_averaged_over_the_batch():
    s = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]], requires_grad=True)
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], requires_grad=True)
    # row 0: p_t = (3/4, 1/4), p_s = (1/2, 1/2); row 1: p_t = (1/2, 1/2), p_s = (4/5, 1/5)
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl1 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    value = student_loss(s, t)
    assert value.item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    value.backward()
    assert t.grad is None  # the teacher's output is detached
    # d/ds of batch-mean KL = (softmax(s) - softmax(t)) / B
    assert torch.allclose(s.grad, torch.tensor([[0.5 - 0.75, 0.5 - 0.25], [0.8 - 0.5, 0.2 - 0.5]]) / 2, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the step


def test_dafl_step_one_teacher_forward_and_separate_gradients():
    torch.manual_seed(0)
    teacher = CountingTeacher(create_model("lenet5", 10, 1, 32))
    student = create_model("lenet5_half", 10, 1, 32).train()
    g = DAFLGenerator(100, 32, 1, 16)
    # lr 0: the step leaves the parameters alone, so the gradients it computed can be checked.
    opt_g = torch.optim.SGD(g.parameters(), lr=0.0)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.0)
    z = torch.randn(8, 100)
    teacher_before = [p.clone() for p in teacher.parameters()]
    x, t_logits, losses = dafl_step(g, teacher, student, opt_g, opt_s, z, oh=1.0, a=0.1, ie=5.0)
    assert teacher.queries == 8  # exactly one teacher forward on the batch
    assert set(losses) == {"loss_oh", "loss_a", "loss_ie", "loss_g", "loss_s"}
    assert x.shape == (8, 1, 32, 32) and t_logits.shape == (8, 10) and t_logits.dtype == torch.float32
    assert losses["loss_g"].item() == pytest.approx(
        losses["loss_oh"].item() + 0.1 * losses["loss_a"].item() + 5.0 * losses["loss_ie"].item(), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters())

    # G's gradient is L_G's alone, S's is L_S's alone (x detached for the student).
    x_ref = g(z)
    t_logits_ref = teacher.module(x_ref)
    f_ref = teacher.module.forward_features(x_ref)
    loss_g = one_hot_loss(t_logits_ref) + 0.1 * activation_loss(f_ref) + 5.0 * information_entropy_loss(t_logits_ref)
    grads_g = torch.autograd.grad(loss_g, list(g.parameters()))
    for p, ref in zip(g.parameters(), grads_g):
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-6)
    grads_s = torch.autograd.grad(student_loss(student(x_ref.detach()), t_logits_ref), list(student.parameters()))
    for p, ref in zip(student.parameters(), grads_s):
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# presets and budget (METHODS.md's DAFL table)


def test_presets_match_the_paper_table():
    dafl = get_method("dafl")
    assert dafl.data_access is DataAccess.NONE and dafl.tracks_best
    preset, mnist = dafl.resolve_config("mnist")
    assert preset == "mnist"
    assert (mnist.oh, mnist.a, mnist.ie) == (1.0, 0.1, 5.0)
    assert (mnist.batch_size, mnist.epochs, mnist.iters_per_epoch) == (512, 200, 120)
    assert (mnist.lr_G, mnist.optimizer, mnist.lr, mnist.milestones) == (0.2, "adam", 2e-3, [])
    assert (mnist.latent_dim, mnist.gen_width) == (100, 128)
    assert dafl.resolve_config("fashion_mnist")[0] == "mnist"
    for name, weights in (("cifar10", (0.05, 0.01, 5.0)), ("cifar100", (0.5, 0.1, 20.0))):
        preset, cfg = dafl.resolve_config(name)
        assert preset == name
        assert (cfg.oh, cfg.a, cfg.ie) == weights
        assert (cfg.batch_size, cfg.epochs, cfg.iters_per_epoch) == (1024, 2000, 120)
        assert cfg.lr_G == 0.02
        assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
        assert (cfg.milestones, cfg.lr_decay) == ([800, 1600], 0.1)
        assert (cfg.latent_dim, cfg.gen_width) == (1000, 128)


def test_budget_scales_iterations_and_milestones_only_and_fields_override():
    dafl = get_method("dafl")
    _, cfg = dafl.resolve_config("cifar10")
    plan = schedule(cfg, 0.01, 50000)  # the dataset size does not matter: 120 iterations per epoch
    assert plan.total == 2400 and plan.milestones == (960, 1920)
    assert schedule(cfg, 0.01, 10).total == 2400
    _, cheap = dafl.resolve_config("fashion_mnist", overrides={"gen_width": 32, "batch_size": 256})
    assert (cheap.gen_width, cheap.batch_size, cheap.lr_G, cheap.ie) == (32, 256, 0.2, 5.0)
    with pytest.raises(ConfigError, match="gen_width must be an even integer >= 2, got 31"):
        dafl.resolve_config("fashion_mnist", overrides={"gen_width": 31})


def test_context_refuses_training_data_to_dafl(digits, tmp_path):
    dafl = get_method("dafl")
    ctx = make_ctx(digits, dafl.data_access, tmp_path)
    for call in (ctx.train_data, lambda: next(ctx.train_batches(8)), lambda: ctx.few_samples(1),
                 lambda: ctx.alt_images("mnist_5k")):
        with pytest.raises(DataAccessError, match="data_access='none'"):
            call()
    assert ctx.real_samples_used == 0


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_short_dafl_run_on_digits_improves_the_student_without_real_data(digits, teacher, tmp_path):
    dafl = get_method("dafl")
    # 60 iterations (budget 0.0025 of 24,000) at a small batch and a narrow generator: seconds on a CPU.
    _, cfg = dafl.resolve_config("digits", overrides={"batch_size": 64, "gen_width": 32, "samples": 16,
                                                      "eval_every": 30, "log_every": 20})
    torch.manual_seed(0)
    student = create_model("lenet5_half", 10, 1, 32)
    before = _accuracy(student, digits)
    outcome = run_distill(dafl(cfg), teacher.model, student, digits, tmp_path, budget=0.0025)
    student = outcome.student
    after = _accuracy(student.eval(), digits)
    assert after >= before + 20, (before, after)
    # trained in channels_last (cfg.channels_last), deployed in the default layout
    assert all(p.is_contiguous() for p in student.parameters())
    assert outcome.real_samples_used == 0
    assert outcome.teacher_queries == 60 * 64  # one teacher forward per iteration (evaluation uses the student only)
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert not any("val_acc" in row for row in curve)  # ctx.evaluate gave the method no labelled feedback
    assert outcome.best_test is not None and outcome.best_test >= after - 1e-9  # recorded, never returned
    logged = [row for row in curve if "loss_g" in row]
    assert [row["step"] for row in logged] == [20, 40, 60]
    assert all(k in logged[0] for k in ("loss_oh", "loss_a", "loss_ie", "loss_s", "lr_s", "sample_std"))
    assert all(row["sample_std"] > 0.05 for row in logged)  # varied images, not one collapsed image
    assert (tmp_path / "samples.png").stat().st_size > 0
