"""Teacher access enforced by construction, and the black-box methods (DFME, hard-label DFME)."""
from __future__ import annotations

import pytest
import torch

from bench.method import DataAccess, Method, TeacherAccess, TeacherAccessError, get_method
from bench.models import create_model
from bench.monitor import Budget
from bench.teacher_access import FeatureTeacher, LabelTeacher, NoTeacher, OutputTeacher, teacher_view
from methods.black_box import forward_difference_gradient
from tests.helpers import run_distill


def _lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lenet5", 10, 1, 32)


# ---------------------------------------------------------------------------------------------
# what each view allows


FORBIDDEN = {
    "back-propagate": lambda t, x: t(x.requires_grad_(True)),
    "read .module": lambda t, x: t.module,
    "hook a layer": lambda t, x: t.register_forward_hook(lambda *a: None),
    "read its weights": lambda t, x: t.parameters(),
    "read its state": lambda t, x: t.state_dict(),
}


class Trespasser(Method):
    """A plugin that, at its first step, tries one thing its access does not allow (``attempt``)."""

    attempt = ""

    def distill(self, teacher, student, ctx):
        for _ in ctx.steps(1, "trespass"):
            FORBIDDEN[self.attempt](teacher, ctx.noise(4))
        return student


@pytest.mark.parametrize("access", [TeacherAccess.LABELS, TeacherAccess.OUTPUTS, TeacherAccess.FEATURES])
@pytest.mark.parametrize("attempt", sorted(FORBIDDEN))
def test_a_method_that_exceeds_its_teacher_access_gets_an_error_naming_it(access, attempt, digits, tmp_path):
    cls = type(f"Trespass_{access.value}", (Trespasser,),
               {"data_access": DataAccess.NONE, "teacher_access": access, "attempt": attempt})
    with pytest.raises(TeacherAccessError, match=f"declared teacher_access='{access.value}'"):
        run_distill(cls(cls.Config()), _lenet(), create_model("lenet5_half", 10, 1, 32), digits, tmp_path)


@pytest.mark.parametrize("access", [TeacherAccess.NONE, TeacherAccess.WEIGHTS])
def test_a_method_without_teacher_access_cannot_query_it(access):
    view = teacher_view(access, _lenet(), counter=None)
    assert isinstance(view, NoTeacher)
    with pytest.raises(TeacherAccessError, match=f"teacher_access='{access.value}'"):
        view(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TeacherAccessError):
        view.module


def test_a_hard_label_teacher_returns_only_class_indices():
    model = _lenet()
    view = teacher_view(TeacherAccess.LABELS, model, counter=None)
    x = torch.randn(6, 1, 32, 32)
    out = view(x)
    assert isinstance(view, LabelTeacher) and not isinstance(view, OutputTeacher)
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert torch.equal(out, model(x).argmax(1))
    for call in ("log_probs", "features_and_logits", "layer_outputs"):
        with pytest.raises(TeacherAccessError, match="'labels'"):
            getattr(view, call)


def test_an_outputs_teacher_returns_detached_probabilities_or_logits_as_the_grid_says():
    model = _lenet()
    x = torch.randn(5, 1, 32, 32)
    logits = model(x).detach()
    probs_view = teacher_view(TeacherAccess.OUTPUTS, model, counter=None, outputs="probs")
    logits_view = teacher_view(TeacherAccess.OUTPUTS, model, counter=None, outputs="logits")
    probs = probs_view(x)
    assert not probs.requires_grad and torch.allclose(probs.sum(1), torch.ones(5))
    assert torch.allclose(probs, logits.softmax(1), atol=1e-6)
    assert torch.equal(logits_view(x), logits)
    # log_probs agree whichever the API returns, so KD and DFME see the same targets
    assert torch.allclose(probs_view.log_probs(x), logits_view.log_probs(x), atol=1e-5)
    with pytest.raises(TeacherAccessError, match="'outputs'"):
        probs_view.forward_features(x)
    with pytest.raises(ValueError, match="logits, probs"):
        teacher_view(TeacherAccess.OUTPUTS, model, counter=None, outputs="scores")


def test_a_features_teacher_gives_detached_activations_and_layer_widths_but_no_weights():
    model = _lenet()
    view = teacher_view(TeacherAccess.FEATURES, model, counter=None)
    assert isinstance(view, FeatureTeacher) and not isinstance(view, torch.nn.Module)
    x = torch.randn(3, 1, 32, 32)
    features, logits = view.features_and_logits(x)
    assert torch.allclose(logits, model(x)) and not features.requires_grad
    name = next(iter(view.layer_shapes()))
    assert view.layer_outputs(x, [name])[name].shape[0] == 3
    shape = view.layer_shapes()[name]
    assert shape.kind is torch.nn.Conv2d and shape.out == model.get_submodule(name).out_channels
    assert not any(isinstance(v, torch.nn.Module) for v in vars(type(view)).values())
    assert not hasattr(view, "__dict__")  # slots only: an opaque token, no reference to the teacher


def test_every_query_through_a_view_is_counted(digits, tmp_path):
    class Ask(Method):
        data_access = DataAccess.NONE
        teacher_access = TeacherAccess.LABELS

        def distill(self, teacher, student, ctx):
            for _ in ctx.steps(3, "ask"):
                with ctx.queries_for("probe"):
                    teacher(ctx.noise(7))
                teacher.labels(ctx.noise(2))
            return student

    outcome = run_distill(Ask(Ask.Config()), _lenet(), create_model("lenet5_half", 10, 1, 32), digits, tmp_path)
    assert outcome.teacher_queries == 3 * 9
    assert outcome.queries_by == "probe:21"


# ---------------------------------------------------------------------------------------------
# DFME


def test_the_forward_difference_estimate_points_along_the_true_gradient():
    # a smooth function of 64-dim inputs: f(x) = sum(sin(A x)); the estimate averaged over many draws of
    # 200 directions each is close in direction to the true gradient
    torch.manual_seed(0)
    a = torch.randn(16, 64) / 8
    x = torch.randn(4, 1, 8, 8)

    def f(points):
        return torch.sin(points.reshape(points.shape[0], -1) @ a.t()).sum(1)

    xg = x.clone().requires_grad_(True)
    f(xg).sum().backward()
    estimate, value = forward_difference_gradient(f, x, directions=200, epsilon=1e-3, activation=lambda v: v)
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(1), xg.grad.flatten(1), dim=1)
    assert value == pytest.approx(f(x).mean().item(), rel=1e-5)
    assert cosine.min() > 0.6, cosine  # one draw of m = 200 of d = 64 directions; E[cos] ~ sqrt(m / (m + d))
    single, _ = forward_difference_gradient(f, x, directions=1, epsilon=1e-3, activation=lambda v: v)
    assert single.shape == x.shape


def test_dfme_counts_its_queries_by_the_papers_formula_and_splits_them(digits, tmp_path):
    method_cls = get_method("dfme")
    cfg = method_cls.resolve_config("digits", overrides={"batch_size": 16, "query_budget": 10**6, "samples": 0})[1]
    rounds = 3
    outcome = run_distill(method_cls(cfg), _lenet(), create_model("lenet5_half", 10, 1, 32), digits, tmp_path,
                          budget=Budget(student_steps=rounds * cfg.d_iter))
    per_round = cfg.batch_size * (cfg.g_iter * (cfg.grad_m + 1) + cfg.d_iter)
    assert per_round == cfg.queries_per_round == 16 * 7
    assert outcome.teacher_queries == rounds * per_round
    generator = rounds * cfg.batch_size * cfg.g_iter * (cfg.grad_m + 1)
    assert outcome.queries_by == f"generator:{generator} student:{rounds * cfg.batch_size * cfg.d_iter}"


def test_dfme_presets_are_the_official_scripts():
    cls = get_method("dfme")
    assert cls.teacher_access is TeacherAccess.OUTPUTS and cls.data_access is DataAccess.NONE
    _, cifar = cls.resolve_config("cifar10")
    _, svhn = cls.resolve_config("svhn")
    assert (cifar.query_budget, cifar.lr_G, cifar.steps) == (20_000_000, 5e-4, [0.1, 0.3, 0.5])
    assert (svhn.query_budget, svhn.lr_G, svhn.steps) == (2_000_000, 5e-5, [0.5, 0.8])
    for cfg in (cifar, svhn):  # train.py's defaults
        assert (cfg.batch_size, cfg.g_iter, cfg.d_iter, cfg.grad_m, cfg.grad_epsilon, cfg.lr_S, cfg.latent_dim,
                cfg.scale) == (256, 1, 5, 1, 1e-3, 0.1, 256, 0.3)


def test_dfme_beats_kd_on_noise_at_the_same_query_budget(digits, teacher, tmp_path, one_thread):
    budget = Budget(teacher_queries=40_000)
    scores = {}
    for name, params in (("dfme", {"samples": 0}), ("kd_noise", {})):
        cls = get_method(name)
        cfg = cls.resolve_config("digits", overrides=params)[1]
        torch.manual_seed(0)
        student = create_model("lenet5_half", 10, 1, 32)
        outcome = run_distill(cls(cfg), teacher.model, student, digits, tmp_path / name, budget=budget)
        assert outcome.teacher_queries <= 40_000
        scores[name] = outcome.anytime[-1]["val_acc"]
    assert scores["dfme"] > scores["kd_noise"] + 10, scores


def test_hard_label_dfme_learns_from_labels_alone(digits, teacher, tmp_path, one_thread):
    cls = get_method("dfme_hl")
    assert cls.teacher_access is TeacherAccess.LABELS
    cfg = cls.resolve_config("digits", overrides={"samples": 0})[1]
    rounds = 26  # 39,936 queries
    outcome = run_distill(cls(cfg), teacher.model, create_model("lenet5_half", 10, 1, 32), digits, tmp_path,
                          budget=Budget(student_steps=rounds * cfg.d_iter))
    assert outcome.teacher_queries == rounds * cfg.batch_size * (cfg.g_iter + cfg.d_iter)
    assert outcome.anytime[-1]["val_acc"] > 40, outcome.anytime  # chance is 10 %
