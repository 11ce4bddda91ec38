"""FSKD (methods/fskd.py) and the block-fitting pieces it shares with its baselines (methods/block_fitting.py).

- the exact merge of a 1x1 Q into the preceding conv (with and without BatchNorm in between),
- the streamed least-squares solve,
- the context's few-sample limit,
- FSKD on a real pruned LeNet-5 teacher (digits): it recovers accuracy without labels, at zero extra cost,
- the baselines that need a student derived from the teacher refuse any other student.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from bench.data import DatasetInfo, ImageData
from bench.transforms import to_float
from bench.lineage import StudentContext
from bench.method import CountingTeacher, DataAccess, DataAccessError, DistillContext, get_method
from bench.metrics import count_flops, count_params, evaluate_accuracy
from bench.models import create_model
from bench.pruning import build_pruned
from bench.students import build_student
from methods.block_fitting import (NormalEquations, NotDerivedError, apply_q, fit_points, insert_q, merge_q,
                                   solve_q)
from tests.helpers import run_distill
from tests.test_pruning import example, make_teacher

CPU = torch.device("cpu")


def _random_q(c: int, g: torch.Generator) -> torch.Tensor:
    """A random, well-conditioned, clearly non-identity C x C map (float64)."""
    return torch.eye(c, dtype=torch.float64) + torch.randn(c, c, generator=g, dtype=torch.float64) / c ** 0.5


# ---------------------------------------------------------------------------------------------
# merge equivalence


@pytest.mark.parametrize("arch, channels, spec, n_points, n_bn", [
    ("lenet5", 1, "pruned:l1:0.5", 4, 0),  # conv1..conv3 and fc1, no BN
    ("vgg11_bn", 3, "pruned:l1:0.5", 8, 8),  # every conv, each followed by its BN
    ("resnet18", 3, "pruned:slim:0.3", 20, 20),  # stem, both convs of every block (before the addition), shortcuts
    ("wrn_16_1", 3, "pruned:l1:0.5", 15, 6),  # pre-activation: conv1 -> bn2 in a block; the stem also feeds a shortcut
])
def test_merging_each_q_equals_the_student_with_q_inserted(arch, channels, spec, n_points, n_bn):
    # float64 throughout, so that the only differences are rounding (measured: at most 7e-16 on outputs of size
    # 0.1-0.75): the 1e-5 bound holds with a wide margin, and a wrong merge misses it by far (0.046 for
    # the BN fold of a conv that also feeds a shortcut, before that was fixed).
    teacher = make_teacher(arch, channels)
    student, lineage = build_pruned(teacher, spec, example(channels))
    student = student.double().eval()
    points = fit_points(student, teacher, example(channels).double(), lineage.kept_channels, spec=spec)
    assert len(points) == n_points and sum(p.bn is not None for p in points) == n_bn
    g = torch.Generator().manual_seed(1)
    qs = [_random_q(len(p.kept), g) for p in points]
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    params = count_params(student)

    unmerged, merged = copy.deepcopy(student), copy.deepcopy(student)
    handles = [insert_q(unmerged, p, q) for p, q in zip(points, qs)]
    for p, q in zip(points, qs):
        merge_q(merged, p, q)
    x = torch.randn(3, channels, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        plain, with_q, out = student(x), unmerged(x), merged(x)
    for h in handles:
        h.remove()
    scale = with_q.abs().max()
    assert (with_q - plain).abs().max() > 1e-2 * scale  # the Q's do change the function: the test can fail
    assert (out - with_q).abs().max() <= 1e-5 * max(1.0, float(scale)), float((out - with_q).abs().max())
    # Merged: exactly the pruned architecture (same shapes, hence the same MACs), same parameter count.
    assert {k: v.shape for k, v in merged.state_dict().items()} == shapes
    assert count_params(merged) == params


def test_bn_is_folded_before_merging_not_after():
    # The official FSKD code merges Q into the conv *before* BN (BN(Q W x)); with distinct BN scales that is
    # a different function from Q BN(W x). The merge here must reproduce the latter.
    conv, bn = nn.Conv2d(4, 5, 3, padding=1).double(), nn.BatchNorm2d(5).double()
    model = nn.Sequential(conv, bn, nn.Linear(6, 6).double()).eval()  # Linear on the last dim: a stand-in head
    kept = {"0": tuple(range(5)), "2": tuple(range(6))}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
        bn.running_var.copy_(torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
        bn.running_mean.normal_(generator=g)
        bn.bias.normal_(generator=g)
    (point,) = [p for p in fit_points(model, model, torch.zeros(1, 4, 6, 6, dtype=torch.float64), kept) if p.layer == "0"]
    assert point.bn == "1"
    q = _random_q(5, g)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected = apply_q(bn(conv(x)), q)
        wrong = bn(nn.functional.conv2d(x, torch.einsum("oc,c...->o...", q, conv.weight), q @ conv.bias, padding=1))
        merge_q(model, point, q)
        got = model[1](model[0](x))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (wrong - expected).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# least squares


def test_streamed_normal_equations_recover_a_known_1x1_map():
    g = torch.Generator().manual_seed(0)
    c_in, c_out = 12, 9
    q_true = torch.randn(c_out, c_in, generator=g, dtype=torch.float64)
    scales = torch.rand(c_in, generator=g, dtype=torch.float64) * 1.5 + 0.5  # distinct channel scales and offsets
    offsets = torch.randn(c_in, generator=g, dtype=torch.float64)
    eq, one_shot = NormalEquations(c_in, c_out), NormalEquations(c_in, c_out)
    xs = []
    for n in (7, 5, 13):  # uneven batches of (N, C, H, W) feature maps
        x = torch.randn(n, c_in, 4, 4, generator=g, dtype=torch.float64) * scales[:, None, None] + offsets[:, None, None]
        eq.add(x.float(), apply_q(x, q_true))  # student features arrive as float32, as in the method
        xs.append(x.float())
    x_all = torch.cat(xs)
    one_shot.add(x_all, apply_q(x_all.double(), q_true))
    assert eq.count == one_shot.count == 25 * 16
    torch.testing.assert_close(eq.xtx, one_shot.xtx, rtol=1e-12, atol=0)
    q = eq.solve()
    assert q.shape == (c_out, c_in) and q.dtype == torch.float32
    # Q is returned in float32: agreement to float32 rounding of its entries (relative ~1e-7) and the tiny ridge.
    torch.testing.assert_close(q.double(), q_true, rtol=1e-6, atol=1e-6 * float(q_true.abs().max()))

    # Linear features (N, C): one row per sample.
    lin = NormalEquations(c_in, c_out)
    x2 = torch.randn(50, c_in, generator=g, dtype=torch.float64)
    lin.add(x2, x2 @ q_true.t())
    torch.testing.assert_close(lin.solve().double(), q_true, rtol=1e-6, atol=1e-6 * float(q_true.abs().max()))


def test_solve_tolerates_a_dead_channel():
    # A pruned filter that never fires gives an all-zero column of X: X^T X is singular; the ridge keeps the
    # solve finite, the live channels' map exact and the dead channel's coefficients at zero.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    x[:, 2] = 0
    q_true = torch.randn(6, 6, generator=g, dtype=torch.float64)
    q_true[:, 2] = 0
    y = x @ q_true.t()
    q = solve_q(x.t() @ x, x.t() @ y)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), q_true, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# FSKD on a real pruned teacher


@pytest.fixture(scope="module")
def lenet():
    """An untrained LeNet-5 teacher (enough for everything but the accuracy test), its pruned student and lineage."""
    model = make_teacher("lenet5", 1)
    return (model, *build_pruned(model, "pruned:l1:0.5", example(1)))


def _context(method, data, tmp_path, cls=DistillContext, few_limit=None, lineage=None):
    access = type(method).data_access
    limit = method.real_samples_limit(data.info) if access is DataAccess.FEW and few_limit is None else few_limit
    few = (data.train_x[:limit], None) if limit else None
    return cls(info=data.info, data_access=access, device=CPU, seed=0, out_dir=tmp_path, few=few, lineage=lineage)


def _method(name, **params):
    cls = get_method(name)
    return cls(cls.resolve_config("digits", overrides=params)[1])


def _accuracy(model, digits):
    return evaluate_accuracy(model.eval(), digits.test_x, digits.test_y, lambda xb: to_float(xb, digits.info))


def test_fskd_is_the_paper_method_and_fskd_plus_the_harness_variant():
    paper, plus = _method("fskd").config, _method("fskd_plus").config
    assert (paper.fit_linear, paper.fit_classifier, paper.ridge) == (False, False, 1e-8)
    assert (plus.fit_linear, plus.fit_classifier) == (True, True) and plus.ridge > paper.ridge
    assert not get_method("fskd").few_labels and not get_method("fskd_plus").few_labels


@pytest.mark.slow  # trains the digits teacher unless the session cache has it (test_runner and the smoke grid share it)
def test_fskd_recovers_the_pruned_lenet5_without_labels_at_zero_extra_cost(teacher, digits, cache_dir, tmp_path):
    assert teacher.accuracy > 90
    built = build_student("pruned:l1:0.5", StudentContext(teacher=teacher.model, teacher_key=teacher.key,
                                                          teacher_arch="lenet5", info=digits.info, cache_dir=cache_dir,
                                                          device=CPU))
    pruned, lineage = built.model, built.lineage
    params, macs = count_params(pruned), count_flops(pruned, (1, 32, 32))[1]
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}

    baseline = run_distill(_method("no_recovery"), teacher.model, copy.deepcopy(pruned), digits, tmp_path / "none",
                           lineage=lineage)
    base_acc = _accuracy(baseline.student, digits)
    assert baseline.real_samples_used == 0 and baseline.teacher_queries == 0

    # the paper's FSKD (conv blocks, plain least squares) and the harness's variant (+ fc1, + classifier, ridge)
    for name, blocks in (("fskd", 3), ("fskd_plus", 5)):
        out = tmp_path / name
        method = _method(name, n_samples=100)
        recovered = run_distill(method, teacher.model, copy.deepcopy(pruned), digits, out, lineage=lineage)
        acc = _accuracy(recovered.student, digits)
        assert acc > base_acc + 15, (name, base_acc, acc)
        assert recovered.real_samples_used == 100 and recovered.teacher_queries == 100  # one cached teacher pass
        assert count_params(recovered.student) == params and count_flops(recovered.student, (1, 32, 32))[1] == macs
        assert {k: v.shape for k, v in recovered.student.state_dict().items()} == shapes
        curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
        assert len(curve) == blocks  # one log per block
        if name == "fskd":  # plain least squares: each fit beats Q = I on its rows
            assert all(r["rel_err_after"] <= r["rel_err_before"] + 1e-9 for r in curve)


def test_fskd_fit_does_not_depend_on_streaming_or_teacher_caching(lenet, digits, tmp_path):
    # n = 100 > 60: conv3's output map is 1x1, so its system has only n rows for 60 unknowns per channel; at n <= 60
    # it is (near-)singular and float32 rounding differences between batchings get amplified (measured on the
    # trained digits teacher at n=60: conv3 weights up to 7.4 against 0.5 at n=100, 2e-5 differences in fc1).
    results = []
    for i, params in enumerate([dict(n_samples=100), dict(n_samples=100, batch_size=17, cache_teacher=False)]):
        method = _method("fskd_plus", ridge=1e-8, **params)
        counted = CountingTeacher(lenet[0])
        ctx = _context(method, digits, tmp_path / str(i), lineage=lenet[2])
        results.append((method.distill(counted, copy.deepcopy(lenet[1]), ctx), counted.queries))
        ctx.close()
    (cached, q_cached), (streamed, q_streamed) = results
    assert q_cached == 100 and q_streamed == 100 * 5  # re-run per block: n x blocks (conv1-3, fc1, fc2) x passes
    for (name, a), b in zip(cached.state_dict().items(), streamed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_fskd_fits_every_block_of_a_pre_activation_wrn(tmp_path):
    # BN folded into convs, convs fitted before a residual addition, and the stem fitted before a BN it shares
    # with a shortcut: on 32 random images, every block's closed-form fit cannot be worse than Q = I.
    g = torch.Generator().manual_seed(0)
    info = DatasetInfo(name="random", num_classes=10, channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                       train_size=32, augment="none")
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = ImageData(info=info, train_x=x, train_y=torch.arange(32) % 10, test_x=x[:4], test_y=torch.arange(4))
    teacher = make_teacher("wrn_16_1", 3)
    student, lineage = build_pruned(teacher, "pruned:l1:0.5", example(3))
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    fskd = _method("fskd", n_samples=32)  # plain least squares (a ridge trades fit for stability)
    ctx = _context(fskd, data, tmp_path, lineage=lineage)
    fitted = fskd.distill(CountingTeacher(teacher), student, ctx)
    ctx.close()
    assert {k: v.shape for k, v in fitted.state_dict().items()} == shapes
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert len(curve) == 15  # the 15 convs (the paper's FSKD fits no Q on the classifier)
    assert all(r["rel_err_after"] <= r["rel_err_before"] + 1e-6 for r in curve), curve
    # the first block the pruning changed (a block whose channels all survive starts with no error to fit)
    first = next(r for r in curve if r["rel_err_before"] > 1e-6)
    assert first["rel_err_after"] < 0.9 * first["rel_err_before"]


def test_context_refuses_more_samples_than_the_method_declared(lenet, digits, tmp_path):
    fskd = _method("fskd", n_samples=20)
    ctx = _context(fskd, digits, tmp_path, lineage=lenet[2])
    with pytest.raises(DataAccessError, match="few_samples\\(21\\).*n_samples=20"):
        ctx.few_samples(21)
    # A context granting fewer samples than the method's config asks for stops the method before it reads any.
    short = _context(fskd, digits, tmp_path, few_limit=10, lineage=lenet[2])
    with pytest.raises(DataAccessError, match="n_samples=10"):
        fskd.distill(CountingTeacher(lenet[0]), copy.deepcopy(lenet[1]), short)
    assert short.real_samples_used == 0


@pytest.mark.parametrize("name", ["no_recovery", "fitnet_few", "fskd", "fskd_plus"])
def test_block_fitting_methods_refuse_a_student_not_derived_from_the_teacher(name, lenet, digits, tmp_path):
    method = _method(name, **({} if name == "no_recovery" else {"n_samples": 10}))
    student = create_model("lenet5_half", 10, 1, 32)
    with pytest.raises(NotDerivedError) as err:
        method.distill(CountingTeacher(lenet[0]), student, _context(method, digits, tmp_path))
    assert "'LeNet5'" in str(err.value) and "not derived from the teacher" in str(err.value)
    assert "pruned:l1:0.5" in str(err.value)


def test_a_student_pruned_from_another_teacher_is_refused(digits, tmp_path):
    # kept channels present, but the layers do not match this teacher's: an error naming the student and the layer.
    student, lineage = build_pruned(make_teacher("vgg11", 1), "pruned:l1:0.5", example(1))
    with pytest.raises(NotDerivedError, match=r"student 'pruned:l1:0\.5'.*'features\.0'"):
        fit_points(student, make_teacher("lenet5", 1), example(1), lineage.kept_channels, spec="pruned:l1:0.5")
