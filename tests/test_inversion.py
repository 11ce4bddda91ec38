"""The model-inversion methods (deepinversion, adi, cmi, fast_dfkd, zskd) and their shared pieces.

Losses against values computed by hand on tiny tensors; the BN hook reads the BN input; CMI's positives
are the matching views; Fast-DFKD's meta step moves the persistent generator; ZSKD's Dirichlet
concentration comes from the teacher's weights; data access; BN-free teachers refused; short real runs.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError
from bench.method import CountingTeacher, DataAccess, DataAccessError, TeacherAccess, get_method
from bench.models import create_model
from bench.monitor import Budget
from methods.bn_stats import BNStatistics, NoBatchNormError
from methods.cmi import MemoryBank, contrastive_loss
from methods.fast_dfkd import FastDFKDConfig, meta_synthesise
from methods.generator import DataFreeGenerator, reinitialise
from methods.image_pool import ImagePool
from methods.image_priors import random_crop, random_resized_crop, total_variation_4
from methods.losses import adi_competition_loss, decision_adversarial_loss, js_divergence
from methods.pool_kd import best_so_far
from methods.zskd import (class_similarity, dirichlet_concentration, final_layer_weights, impression_loss)
from tests.helpers import make_ctx, method_ctx, run_distill

CPU = torch.device("cpu")
INVERSION = ("deepinversion", "adi", "cmi", "fast_dfkd", "zskd")
BN_METHODS = ("deepinversion", "adi", "cmi", "fast_dfkd")


@pytest.fixture(scope="session")
def bn_teacher(digits, cache_dir):
    """The digits LeNet-5-BN teacher (15 epochs, as the smoke grid's teachers)."""
    from bench.teachers import get_teacher, recipe_for

    return get_teacher("digits", "lenet5_bn", digits, CPU, seed=0, recipe=recipe_for("digits", {"epochs": 15}),
                       cache_dir=cache_dir)


# Short settings for seconds-long runs on digits (hand-set, the former grey presets; the grey sets' `paper` track
# runs the papers' CIFAR-10 values, whose 2,000-step syntheses no test can afford)
_DEEPINV_SHORT = dict(synth_batch=64, g_steps=40, lr_g=0.1, beta1=0.5, beta2=0.99, bn=1.0, tv=1e-3, tv_norm="l1",
                      jitter=2, flip="auto", labels="random", clip=True, kd_steps=50, batch_size=128, optimizer="adam",
                      lr=1e-3, weight_decay=0.0, lr_schedule="constant", epochs=200, iters_per_epoch=400)
SHORT = {
    "deepinversion": _DEEPINV_SHORT,
    "adi": dict(_DEEPINV_SHORT, cig_scale=1.0),
    "cmi": dict(synth_batch=128, g_steps=50, lr_g=1e-2, latent_dim=64, gen_width=8, bank_size=4096, n_neg=1024,
                kd_steps=50, batch_size=128, optimizer="adam", lr=3e-3, weight_decay=0.0, lr_schedule="constant"),
    "fast_dfkd": dict(synth_batch=128, g_steps=5, lr_g=3e-3, lr_z=0.01, gen_width=8, oh=1.0, warmup=5, reset_l0_at=0,
                      kd_steps=20, batch_size=256, optimizer="adam", lr=3e-3, weight_decay=0.0, lr_schedule="constant",
                      lr_min=0.0),
    "zskd": dict(synth_batch=128, g_steps=20, lr_g=0.1, betas=[1.0], kd_steps=20, batch_size=128, lr=3e-3, epochs=200,
                 iters_per_epoch=400),
}


def _method(name, **overrides):
    cls = get_method(name)
    return cls(cls.resolve_config("digits", "cifar10", {**SHORT[name], **overrides})[1])


# ---------------------------------------------------------------------------------------------
# losses and priors, by hand


def test_total_variation_4_by_hand():
    x = torch.tensor([[1.0, 2.0], [4.0, 8.0]]).view(1, 1, 2, 2)
    # right: (1-2, 4-8); down: (1-4, 2-8); the two diagonals: 4-2 and 1-8
    assert total_variation_4(x, "l2").item() == pytest.approx(math.sqrt(17) + math.sqrt(45) + 2 + 7, rel=1e-6)
    assert total_variation_4(x, "l1").item() == pytest.approx(2.5 + 4.5 + 2 + 7, rel=1e-6)
    with pytest.raises(ValueError, match="valid: l1, l2"):
        total_variation_4(x, "l3")


def _softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_js_divergence_and_adi_competition_by_hand():
    a, b = [[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [3.0, -3.0, 0.0]]
    expected = 0.0
    for ra, rb in zip(a, b):
        p, q = _softmax(ra, 3.0), _softmax(rb, 3.0)
        m = [min(max(0.5 * (u + v), 0.01), 0.99) for u, v in zip(p, q)]
        p, q = [min(max(u, 0.01), 0.99) for u in p], [min(max(u, 0.01), 0.99) for u in q]
        kl_mp = sum(mi * (math.log(mi) - math.log(pi)) for mi, pi in zip(m, p))
        kl_mq = sum(mi * (math.log(mi) - math.log(qi)) for mi, qi in zip(m, q))
        expected += 0.5 * kl_mp + 0.5 * kl_mq
    expected /= 2  # batchmean
    js = js_divergence(torch.tensor(a), torch.tensor(b), 3.0)
    assert js.item() == pytest.approx(expected, rel=1e-5)
    assert adi_competition_loss(torch.tensor(a), torch.tensor(b), 3.0).item() == pytest.approx(1 - expected, rel=1e-5)
    same = torch.tensor(a)
    assert adi_competition_loss(same, same).item() == pytest.approx(1.0)  # no disagreement: the worst value


def test_decision_adversarial_loss_masks_disagreeing_samples():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # student: class 0, class 1
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # teacher: class 0, class 0
    ps, pt = _softmax([2.0, 0.0]), _softmax([1.0, 0.0])
    kl0 = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    # sample 0 agrees (kept), sample 1 disagrees (masked); the mean runs over both
    assert decision_adversarial_loss(s, t).item() == pytest.approx(-kl0 / 2, rel=1e-5)


def test_best_so_far_keeps_the_lowest_loss_iterate_without_sync():
    best_x = torch.zeros(2)
    best_loss = torch.full((), float("inf"))
    for loss, x in ((3.0, [1.0, 1.0]), (1.0, [2.0, 2.0]), (2.0, [3.0, 3.0])):
        best_loss = best_so_far(torch.tensor(loss), best_loss, (torch.tensor(x), best_x))
    assert best_loss.item() == 1.0 and best_x.tolist() == [2.0, 2.0]


def test_crops_keep_shape_and_content():
    torch.manual_seed(0)
    x = torch.rand(5, 2, 8, 8)
    assert torch.equal(random_crop(x, 0), x)
    cropped = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert cropped.shape == x.shape
    # every crop is a shifted window of the zero-padded image: its non-zero pixels come from the image
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(5):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(cropped[i], w) for w in windows)
    resized = random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), torch.Generator().manual_seed(2))
    assert torch.allclose(resized, x, atol=1e-5)  # the whole image at scale 1, ratio 1
    assert random_resized_crop(x, (0.25, 1.0), generator=torch.Generator().manual_seed(3)).shape == x.shape


# ---------------------------------------------------------------------------------------------
# BN statistics


def test_bn_hook_reads_the_bn_input_not_its_output():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 16.0]))
    model = nn.Sequential(conv, bn)
    x = torch.tensor([-1.0, 3.0, -1.0, 3.0]).view(4, 1, 1, 1)  # mean 1, biased variance 4
    with BNStatistics(model) as stats:
        out = model(x)
        # the conv output (the BN input) has means (1, 2) and variances (4, 16): exactly the running statistics
        assert stats.loss().item() == pytest.approx(0.0, abs=1e-6)
        # the BN output is normalised (means 0, variances ~1): a hook on it would see a large loss
        assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5
        x2 = x + 1.0  # means (2, 4): ||(1, 2)||, variances unchanged
        model(x2)
        assert stats.loss().item() == pytest.approx(math.sqrt(5), rel=1e-5)


def test_bn_statistics_features_are_channel_means_of_each_bn_input(bn_teacher):
    teacher = bn_teacher.model
    with BNStatistics(teacher, keep_channel_means=True) as stats:
        x = torch.randn(3, 1, 32, 32)
        teacher(x)
        feats = stats.features()
        assert feats.shape == (3, 6 + 16 + 120)
        conv1_out = teacher.conv1(x)
        assert torch.allclose(feats[:, :6], conv1_out.mean(dim=(2, 3)), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# CMI


class _Normalise(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def test_contrastive_loss_positives_are_the_matching_views():
    feats = torch.eye(4)  # orthonormal features: view i matches only view i
    t = 0.5
    loss = contrastive_loss(feats, feats, torch.zeros(0, 8), _Normalise(), t)
    # each row: logit 1/t on the diagonal, 0 elsewhere
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 3))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    shuffled = contrastive_loss(feats, feats[[1, 0, 3, 2]], torch.zeros(0, 8), _Normalise(), t)
    assert shuffled.item() > loss.item() + 1.0  # mismatched global views: the positives are wrong
    # cached rows: (local, global) pairs from the bank, their own mean added to the current batch's
    past = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])
    cached = torch.cat([past, past], dim=1)  # (local, global) of two past images
    with_bank = contrastive_loss(feats, feats, cached, _Normalise(), t)
    proj_l = F.normalize(torch.cat([feats, cached[:, :4]]), dim=1)
    proj_g = F.normalize(torch.cat([feats, cached[:, 4:]]), dim=1)
    ce = F.cross_entropy(proj_l @ proj_g.T / t, torch.arange(6), reduction="none")
    assert with_bank.item() == pytest.approx((ce[:4].mean() + ce[4:].mean()).item(), rel=1e-5)


def test_memory_bank_ring_buffer_and_state():
    bank = MemoryBank(4, 2, CPU)
    assert bank.sample(3).shape == (0, 2)
    bank.add(torch.ones(3, 2))
    bank.add(2 * torch.ones(3, 2))  # wraps: rows 3, 0, 1 replaced
    assert bank.filled == 4 and bank.ptr == 2
    assert bank.data[:, 0].tolist() == [2.0, 2.0, 1.0, 2.0]
    assert bank.sample(10, torch.Generator().manual_seed(0)).shape == (4, 2)
    copy = MemoryBank(4, 2, CPU)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.data, bank.data) and (copy.filled, copy.ptr) == (4, 2)


def test_cmi_generator_reinitialisation_follows_datafree():
    torch.manual_seed(0)
    g = DataFreeGenerator(16, 4, 32, 1)
    reinitialise(g)
    assert abs(g.conv1.weight.std().item() - 0.02) < 0.005 and g.l1.bias.abs().max() == 0
    assert abs(g.bn1.weight.mean().item() - 1.0) < 0.05
    x = g(torch.randn(3, 16))
    assert x.shape == (3, 1, 32, 32) and 0 <= x.min() and x.max() <= 1  # pixels (sigmoid)


# ---------------------------------------------------------------------------------------------
# Fast-DFKD


def test_meta_update_moves_the_persistent_generator_by_the_summed_inner_gradients(bn_teacher):
    torch.manual_seed(0)
    teacher = CountingTeacher(bn_teacher.model)
    cfg = FastDFKDConfig(g_steps=3, lr_g=1e-3, lr_z=0.01, latent_dim=8, gen_width=4, synth_batch=6)
    gen = DataFreeGenerator(8, 4, 32, 1)
    before = [p.detach().clone() for p in gen.parameters()]
    meta_opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g * cfg.g_steps, betas=(0.5, 0.999))
    with BNStatistics(teacher.module, momentum=0.9) as stats:
        images, logits, losses = meta_synthesise(gen, meta_opt, teacher, stats, cfg, lambda x: x,
                                                 torch.arange(6) % 10)
        assert stats.past[0] is not None  # the momentum statistics advanced after the batch
    assert images.shape == (6, 1, 32, 32) and logits.shape == (6, 10)
    assert teacher.queries == 6 * 3  # one teacher forward per inner step
    moved = [(p.detach() - b).abs() for p, b in zip(gen.parameters(), before)]
    assert any(m.max() > 0 for m in moved)
    # the first Adam step moves each parameter with a non-zero summed gradient by lr_g * g_steps
    # (bias-corrected m / sqrt(v) = +-1): the meta step is one step of the persistent generator's own Adam
    step = cfg.lr_g * cfg.g_steps
    for m, p in zip(moved, gen.parameters()):
        grad = meta_opt.state[p]["exp_avg"]
        nonzero = grad.abs() > 1e-12
        if nonzero.any():
            assert torch.allclose(m[nonzero], torch.full_like(m[nonzero], step), rtol=1e-2)


def test_fast_dfkd_config_rejects_bad_momentum():
    with pytest.raises(ConfigError, match="bn_mmt must be in"):
        get_method("fast_dfkd").resolve_config("digits", overrides={"bn_mmt": 1.0})


# ---------------------------------------------------------------------------------------------
# ZSKD


def test_zskd_class_similarity_and_dirichlet_concentration_come_from_the_teachers_weights():
    teacher = create_model("lenet5", 3, 1, 32)
    with torch.no_grad():
        teacher.fc2.weight.zero_()
        teacher.fc2.weight[0, 0] = 1.0  # class 0: e1
        teacher.fc2.weight[1, 0], teacher.fc2.weight[1, 1] = 1.0, 1.0  # class 1: (e1 + e2) / sqrt 2
        teacher.fc2.weight[2, 1] = -2.0  # class 2: -e2
    w = final_layer_weights(teacher, 3)
    assert w.data_ptr() == teacher.fc2.weight.data_ptr()
    c = class_similarity(w)
    # cosines: (0,1) 1/sqrt2, (0,2) 0, (1,2) -1/sqrt2; diagonal 1; min-max over the matrix
    cos = torch.tensor([[1, 2 ** -0.5, 0], [2 ** -0.5, 1, -(2 ** -0.5)], [0, -(2 ** -0.5), 1]])
    expected = (cos - cos.min()) / (cos.max() - cos.min())
    assert torch.allclose(c, expected, atol=1e-6)
    conc = dirichlet_concentration(c, 1, 0.1)
    assert torch.allclose(conc, 0.1 * expected[1] + 1e-4)
    row = dirichlet_concentration(c, 0, 1.0, row_normalise=True)  # the official code's row re-normalisation
    r = expected[0]
    assert torch.allclose(row, (r - r.min()) / (r.max() - r.min()) + 1e-4)
    # samples follow Dir(conc): their mean is conc / sum(conc)
    torch.manual_seed(0)
    conc = dirichlet_concentration(c, 1, 1.0)
    samples = torch.distributions.Dirichlet(conc).sample((20000,))
    assert torch.allclose(samples.mean(0), conc / conc.sum(), atol=0.01)


def test_zskd_batches_cover_every_class_and_alternate_the_betas(teacher, digits, tmp_path):
    method = _method("zskd", synth_batch=12, betas=[1.0, 0.1])
    synthesis = method.synthesis(CountingTeacher(teacher.model), None, method_ctx(method, digits, tmp_path))
    similarity = class_similarity(final_layer_weights(teacher.model, 10))
    assert torch.allclose(synthesis.similarity, similarity)
    torch.manual_seed(0)
    first, beta1 = synthesis.targets()
    second, beta2 = synthesis.targets()
    assert (beta1, beta2) == (1.0, 0.1) and first.shape == (12, 10)
    assert torch.allclose(first.sum(1), torch.ones(12))
    # row i is drawn for class i mod 10: with beta 1 its own class has the largest concentration (1 + 1e-4),
    # so it is the most likely argmax; over many draws each row's mean is concentration / its sum
    torch.manual_seed(1)
    draws = torch.stack([synthesis.targets()[0] for _ in range(400)])[0::2]  # the beta-1 batches
    for i in (0, 3, 11):
        conc = dirichlet_concentration(similarity, i % 10, 1.0)
        assert torch.allclose(draws[:, i].mean(0), conc / conc.sum(), atol=0.03)


def test_zskd_needs_a_final_linear_layer():
    with pytest.raises(ValueError, match="final fully-connected layer"):
        final_layer_weights(nn.Sequential(nn.Conv2d(1, 3, 3)), 3)


def test_impression_loss_by_hand():
    logits = torch.tensor([[20.0, 0.0]])
    y = torch.tensor([[0.25, 0.75]])
    p = _softmax([1.0, 0.0])  # logits / 20
    assert impression_loss(logits, y, 20.0).item() == pytest.approx(-(0.25 * math.log(p[0]) + 0.75 * math.log(p[1])))


# ---------------------------------------------------------------------------------------------
# declared access, BN requirement, pool


@pytest.mark.parametrize("name", INVERSION)
def test_inversion_methods_are_data_free_and_white_box(name, digits, tmp_path):
    method = _method(name)
    assert type(method).data_access is DataAccess.NONE
    assert type(method).teacher_access is TeacherAccess.GRADIENTS
    ctx = method_ctx(method, digits, tmp_path)
    for call in (ctx.train_data, lambda: ctx.few_samples(1), lambda: make_ctx(digits, DataAccess.NONE,
                                                                              tmp_path).train_data()):
        with pytest.raises(DataAccessError):
            call()


@pytest.mark.parametrize("name", BN_METHODS)
def test_bn_methods_refuse_a_teacher_without_batchnorm(name, teacher, digits, tmp_path):
    student = create_model("lenet5_half", 10, 1, 32)
    with pytest.raises(NoBatchNormError, match="lenet5_bn instead of lenet5"):
        _method(name).distill(CountingTeacher(teacher.model), student, method_ctx(_method(name), digits, tmp_path))


def test_image_pool_replaces_the_oldest_and_returns_the_latest():
    pool = ImagePool(capacity=5)
    pool.add(torch.zeros(3, 1, 1, 1))
    pool.add(torch.ones(4, 1, 1, 1))  # capacity 5: two fill it, two replace the two oldest zeros
    assert pool.images.flatten().tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert pool.latest(4).flatten().tolist() == [1.0] * 4
    pool.add(torch.full((1, 1, 1, 1), 2.0))  # replaces the last zero
    assert pool.images.flatten().tolist() == [1.0, 1.0, 2.0, 1.0, 1.0]
    assert pool.latest(2).flatten().tolist() == [1.0, 2.0]
    unbounded = ImagePool()
    unbounded.add(torch.zeros(2, 1, 1, 1))
    unbounded.add(torch.ones(2, 1, 1, 1))
    assert unbounded.latest(3).flatten().tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("name", INVERSION)
def test_every_preset_resolves_and_the_paper_presets_keep_the_papers_values(name):
    cls = get_method(name)
    for preset in cls.presets:
        cls.resolve_config("cifar10", preset=preset)
    assert cls.preset_for_dataset["cifar10"] == "cifar10"
    # the grey sets run the paper's values: its own MNIST/Fashion-MNIST protocol (zskd), else its CIFAR-10 ones
    grey = {k: v for k, v in cls.resolve_config("fashion_mnist")[1].__dict__.items()}
    if name == "zskd":
        assert cls.preset_for_dataset["fashion_mnist"] == "fashion_mnist_paper"
    else:
        assert grey == cls.resolve_config("cifar10")[1].__dict__
    _, cifar = cls.resolve_config("cifar10")
    paper = {  # METHODS.md / the official scripts
        "deepinversion": dict(synth_batch=256, g_steps=2000, lr_g=0.05, bn=10.0, tv=2.5e-5, l2=0.0, jitter=2),
        "adi": dict(synth_batch=256, g_steps=2000, kd_steps=50, cig_scale=1.0, adv_temperature=3.0),
        "cmi": dict(synth_batch=256, g_steps=200, lr_g=1e-3, adv=0.5, bn=1.0, oh=1.0, cr=0.8, cr_T=0.2,
                    temperature=20.0, lr=0.1, kd_steps=400, epochs=200, bank_size=40960, n_neg=4096, head_dim=256),
        "fast_dfkd": dict(g_steps=10, lr_g=2e-3, lr_z=0.01, adv=1.1, bn=10.0, oh=0.4, bn_mmt=0.9, warmup=20,
                          lr=0.2, lr_min=2e-4, epochs=200, iters_per_epoch=400, kd_steps=400, synth_batch=256),
        "zskd": dict(synth_batch=100, g_steps=1500, lr_g=1e-3, di_temperature=20.0, betas=[1.0, 0.1], lr=1e-3,
                     batch_size=64, temperature=20.0, epochs=500),
    }[name]
    assert {k: getattr(cifar, k) for k in paper} == paper


@pytest.mark.parametrize("name, key, value, message", [
    ("deepinversion", "tv_norm", "l3", "tv_norm"), ("deepinversion", "g_steps", 0, "g_steps must be positive"),
    ("cmi", "cr_T", 0.0, "cr_T must be positive"), ("zskd", "betas", [], "betas must be a non-empty list"),
    ("adi", "milestones", [10], "not used here"), ("fast_dfkd", "kd_steps", 0, "kd_steps must be positive"),
])
def test_configs_reject_bad_values(name, key, value, message):
    with pytest.raises(ConfigError, match=message):
        get_method(name).resolve_config("digits", overrides={key: value})


# ---------------------------------------------------------------------------------------------
# short real runs on digits (the BN teacher; zskd also on the BN-free one)

RUNS = {
    "deepinversion": dict(synth_batch=64, g_steps=30, kd_steps=20, batch_size=64, lr=3e-3),
    "adi": dict(synth_batch=64, g_steps=30, kd_steps=20, batch_size=64, lr=3e-3),
    "cmi": dict(synth_batch=64, g_steps=10, kd_steps=20, batch_size=64, lr=3e-3, gen_width=8, latent_dim=32,
                bank_size=256, n_neg=64),
    "fast_dfkd": dict(synth_batch=64, g_steps=3, kd_steps=10, batch_size=64, lr=3e-3, gen_width=8, latent_dim=32,
                      warmup=2),
    "zskd": dict(synth_batch=64, g_steps=30, kd_steps=20, batch_size=64, lr=3e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", INVERSION)
def test_short_digits_run_improves_the_student(name, bn_teacher, digits, tmp_path, one_thread):
    method = _method(name, **RUNS[name], samples=16)
    torch.manual_seed(0)
    student = create_model("lenet5_half", 10, 1, 32)
    out = run_distill(method, bn_teacher.model, student, digits, tmp_path, budget=Budget(student_steps=120))
    assert out.student_steps == 120 and out.real_samples_used == 0
    start, final = out.anytime[0]["val_acc"], out.anytime[-1]["val_acc"]
    assert final >= start + 25, (start, final)
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.slow
def test_deepinversion_counts_every_teacher_query(bn_teacher, digits, tmp_path, one_thread):
    cfg = dict(synth_batch=16, g_steps=4, kd_steps=5, batch_size=8, samples=0)
    before = {k: v.clone() for k, v in bn_teacher.model.state_dict().items()}
    out = run_distill(_method("deepinversion", **cfg), bn_teacher.model, create_model("lenet5_half", 10, 1, 32),
                      digits, tmp_path, budget=Budget(student_steps=12))
    # 3 batches (steps 1, 6, 11) x 16 images x 4 steps, and 12 KD batches of 8
    assert out.teacher_queries == 3 * 16 * 4 + 12 * 8
    # the teacher ran in channels_last and is handed back as it came: contiguous, the same values, no hooks left
    assert all(p.is_contiguous() for p in bn_teacher.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in bn_teacher.model.state_dict().items())
    assert not any(m._forward_hooks for m in bn_teacher.model.modules())


@pytest.mark.slow
def test_zskd_runs_on_a_teacher_without_batchnorm(teacher, digits, tmp_path, one_thread):
    torch.manual_seed(0)
    out = run_distill(_method("zskd", **RUNS["zskd"]), teacher.model, create_model("lenet5_half", 10, 1, 32), digits,
                      tmp_path, budget=Budget(student_steps=120))
    assert out.anytime[-1]["val_acc"] >= out.anytime[0]["val_acc"] + 25


@pytest.mark.slow
def test_fast_dfkd_resumes_exactly_from_an_in_cell_checkpoint(bn_teacher, digits, tmp_path, one_thread):
    """A cell killed after a checkpoint resumes where it was: the same student as an uninterrupted run."""
    cfg = dict(RUNS["fast_dfkd"], samples=0)
    torch.manual_seed(0)
    init = create_model("lenet5_half", 10, 1, 32).state_dict()

    def run(out_dir, steps, checkpoint_every=0.0):
        torch.manual_seed(1)
        student = create_model("lenet5_half", 10, 1, 32)
        student.load_state_dict(init)
        return run_distill(_method("fast_dfkd", **cfg), bn_teacher.model, student, digits, out_dir,
                           budget=Budget(student_steps=steps), checkpoint_every=checkpoint_every)

    straight = run(tmp_path / "straight", 30)
    # the "killed" run: checkpoints every step, stopped by a 17-step cap (its last checkpoint is at step 17)
    run(tmp_path / "resumed", 17, checkpoint_every=1e-9)
    resumed = run(tmp_path / "resumed", 30)
    assert resumed.resumed_from is not None
    for a, b in zip(straight.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)
