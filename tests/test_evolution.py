"""Evolutionary pruning (bench/evolution.py): the genome's layout, the genetic operators, the masked
evaluation against physical pruning, and the evolved student (exact filter counts, cost, cache, seed)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import bench.evolution as evo
import bench.pruning
from bench.config import ConfigError
from bench.data import few_sample_indices
from bench.metrics import count_params
from bench.pruning import build_pruned, cache_folder, prune_channels
from bench.students import StudentContext, build_student, check_spec
from bench.transforms import to_float
from tests.test_pruning import example, make_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _counts(population: torch.Tensor, segs) -> list[list[int]]:
    return [population[:, s.offset:s.offset + s.channels].sum(1).tolist() for s in segs]


@pytest.mark.parametrize("arch, channels, ratio", [("lenet5", 1, 0.5), ("lenet5", 1, 0.3), ("resnet18", 3, 0.3)])
def test_segments_keep_exactly_what_l1_keeps(arch, channels, ratio):
    teacher = make_teacher(arch, channels)
    segs = evo.segments(teacher, ratio, example(channels))
    l1, lineage = build_pruned(teacher, f"pruned:l1:{ratio}", example(channels))
    assert [s.offset for s in segs] == [sum(t.channels for t in segs[:i]) for i in range(len(segs))]
    for s in segs:  # every group's root keeps as many channels as the L1 student's layer
        assert s.keep == len(lineage.kept_channels[s.name]) < s.channels, s.name
    classifier = "fc2" if arch == "lenet5" else "linear"
    assert classifier not in {s.name for s in segs}
    if arch == "lenet5":
        assert [(s.name, s.channels) for s in segs] == [("conv1", 6), ("conv2", 16), ("conv3", 120), ("fc1", 84)]
    # the student an evolved mask gives has exactly the L1 student's shapes (so the same params)
    mask = evo.random_population(1, segs, torch.Generator().manual_seed(0))[0]
    remove = {s.name: [c for c in range(s.channels) if not mask[s.offset + c]] for s in segs}
    model, _, _ = prune_channels(teacher, remove, example(channels), "test")
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in l1.state_dict().items()}
    assert count_params(model) == count_params(l1)


def test_operators_keep_every_segments_count_and_the_elite():
    teacher = make_teacher("lenet5", 1)
    segs = evo.segments(teacher, 0.5, example(1))
    keeps = [s.keep for s in segs]
    gen = torch.Generator().manual_seed(0)
    pop = evo.random_population(16, segs, gen)
    assert pop.dtype == torch.bool and pop.shape == (16, 226)
    assert _counts(pop, segs) == [[k] * 16 for k in keeps]
    assert len({tuple(row.tolist()) for row in pop}) == 16  # random, distinct
    assert torch.equal(evo.repair(pop, segs, gen), pop)  # right counts: unchanged
    for _ in range(20):
        a, b = pop[int(torch.randint(16, (1,), generator=gen))], pop[int(torch.randint(16, (1,), generator=gen))]
        c, d = evo.crossover(a, b, segs, gen)
        m = evo.mutate(a, segs, gen)
        assert _counts(torch.stack([c, d, m]), segs) == [[k] * 3 for k in keeps]
    # mutation changes the genome (a flipped segment cannot be repaired back everywhere), crossover mixes parents
    assert any(not torch.equal(evo.mutate(pop[0], segs, gen), pop[0]) for _ in range(5))
    fitness = torch.rand(16, generator=gen)
    nxt = evo.next_generation(pop, fitness, segs, evo.SETTINGS, gen)
    assert nxt.shape == pop.shape and torch.equal(nxt[0], pop[int(fitness.argmax())])
    assert _counts(nxt, segs) == [[k] * 16 for k in keeps]
    # roulette: proportional to fitness
    draws = torch.tensor([evo.roulette(torch.tensor([1.0, 3.0]), gen) for _ in range(2000)])
    assert 0.70 < draws.float().mean() < 0.80


@pytest.mark.parametrize("arch, channels", [("lenet5_bn", 1), ("resnet18", 3)])
def test_masked_teacher_computes_exactly_the_physically_pruned_network(arch, channels):
    teacher = make_teacher(arch, channels)
    segs = evo.segments(teacher, 0.5, example(channels))
    pop = evo.random_population(3, segs, torch.Generator().manual_seed(1))
    x = torch.randn(4, channels, 32, 32, generator=torch.Generator().manual_seed(2))
    masked = evo.MaskedTeacher(teacher, segs)
    logits = masked.logits(pop, x)
    masked.close()
    assert masked.queries == 12 and logits.shape == (3, 4, 10)
    for p in range(3):
        remove = {s.name: [c for c in range(s.channels) if not pop[p, s.offset + c]] for s in segs}
        model, _, _ = prune_channels(teacher, remove, example(channels), "test")
        with torch.no_grad():
            torch.testing.assert_close(logits[p], model.eval()(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the hooks are gone: the copy is the teacher again
        torch.testing.assert_close(masked.model(x), teacher(x))


def test_errors_by_hand():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[[2.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 3.0]]])  # 2 individuals x 2 images
    torch.testing.assert_close(evo.ERRORS["logit_mse"](z, ref), torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(evo.ERRORS["disagreement"](z, ref), torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    p = ref.softmax(1)
    torch.testing.assert_close(evo.ERRORS["prob_mse"](z, ref)[0, 0], torch.tensor(0.0))
    torch.testing.assert_close(evo.ERRORS["prob_mse"](z, ref)[1, 0], (torch.tensor([0.5, 0.5]) - p[0]).square().mean())


def test_specs_and_settings_are_validated():
    check_spec("pruned:evo:0.5")
    check_spec("pruned:evo:0.5:synthetic")
    check_spec("pruned:evo:0.3:synthetic:logit_mse")
    with pytest.raises(ConfigError) as err:
        check_spec("pruned:evo:0.5:bogus", "grid.yaml: pairs[0].student")
    assert "'bogus'" in str(err.value) and "pruned:evo:0.5:synthetic" in str(err.value)
    assert evo.parse_option("synthetic:logit_mse:generations=5:n_images=64") == \
        (True, {"fitness": "logit_mse", "generations": 5, "n_images": 64})
    assert evo.parse_option("") == (False, {})
    for bad, word in [("pruned:evo:0.5:population=1", "population must be >= 2, got 1"),
                      ("pruned:evo:0.5:generations=x", "'generations=x'"), ("pruned:evo:0.5:eps=1", "'eps=1'")]:
        with pytest.raises(ConfigError, match=word):
            check_spec(bad)
    with pytest.raises(ValueError, match="sum to 1"):
        replace(evo.SETTINGS, p_mutation=0.5).validate()
    with pytest.raises(ValueError, match="fitness 'mae'"):
        replace(evo.SETTINGS, fitness="mae").validate()


def _context(teacher, data, cache_dir: Path, seed: int = 0, real: bool = True) -> StudentContext:
    def real_images(n):
        return data.train_x[few_sample_indices(data.train_y, n, seed=seed, stratified=False)]

    return StudentContext(teacher=teacher.model, teacher_key=teacher.key, teacher_arch="lenet5", info=data.info,
                          cache_dir=cache_dir, device=CPU, real_images=real_images if real else None, seed=seed)


SMALL = "population=8:generations=6:n_images=64"  # a short search, written in the spec


@pytest.mark.slow  # trains the digits teacher unless the session cache has it
def test_evolved_student_removes_exactly_the_requested_filters_is_cached_and_reproducible(teacher, digits, tmp_path,
                                                                                        monkeypatch):
    spec = f"pruned:evo:0.5:{SMALL}"
    ctx = _context(teacher, digits, tmp_path / "a")
    built = build_student(spec, ctx)
    model, lineage = built.model, built.lineage
    assert [model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels, model.fc1.out_features,
            model.fc2.out_features] == [3, 8, 60, 42, 10]
    assert count_params(model) == 15_738  # = pruned:l1:0.5 = lenet5_half
    assert lineage.kept_channels["fc2"] == tuple(range(10))
    cost = lineage.cost
    n, p, g = 64, 8, 6
    assert cost.real_samples == n and cost.seconds > 0
    assert cost.teacher_queries == n + p * n + g * (p - 1) * n + n  # reference, generations (elite kept), the check
    log = json.loads((cache_folder(ctx, spec) / "search.json").read_text())
    assert log["settings"]["population"] == p and len(log["best_fitness"]) == g + 1
    assert all(b >= a for a, b in zip(log["best_fitness"], log["best_fitness"][1:]))  # elitism: never worse
    assert log["cost"]["teacher_queries"] == cost.teacher_queries

    # the kept channels are the evolved mask's: the student is the masked teacher, physically pruned
    x = to_float(digits.test_x[:32], digits.info)
    segs = evo.segments(teacher.model, 0.5, example(1))
    mask = torch.zeros(segs[-1].offset + segs[-1].channels, dtype=torch.bool)
    for s in segs:
        mask[[s.offset + c for c in lineage.kept_channels[s.name]]] = True
    masked = evo.MaskedTeacher(teacher.model, segs)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), masked.logits(mask[None], x)[0], rtol=1e-4, atol=1e-4)
    masked.close()

    def no_search(*args, **kwargs):
        raise AssertionError("the second build must load the cached student")

    monkeypatch.setattr(bench.pruning, "build_pruned", no_search)
    again = build_student(spec, ctx)
    assert again.lineage == lineage
    with torch.no_grad():
        assert torch.equal(again.model.eval()(x), model(x))
    monkeypatch.undo()
    same_seed = build_student(spec, _context(teacher, digits, tmp_path / "b")).lineage
    assert same_seed.kept_channels == lineage.kept_channels  # reproducible from the seed
    other_ctx = _context(teacher, digits, tmp_path / "a", seed=1)  # same cache: the seed is part of the key
    assert cache_folder(other_ctx, spec) != cache_folder(ctx, spec)
    other_seed = build_student(spec, other_ctx).lineage
    assert other_seed.kept_channels != lineage.kept_channels


@pytest.mark.slow
def test_synthetic_search_reads_no_real_image(teacher, digits, tmp_path):
    with pytest.raises(bench.pruning.PruningError, match="pruned:evo:0.5:synthetic"):
        build_student(f"pruned:evo:0.5:{SMALL}", _context(teacher, digits, tmp_path, real=False))
    built = build_student(f"pruned:evo:0.5:synthetic:{SMALL}:synth_steps=20", _context(teacher, digits, tmp_path, real=False))
    n = 64
    assert built.lineage.cost.real_samples == 0
    assert built.lineage.cost.teacher_queries == n * 20 + n + 8 * n + 6 * 7 * n + n
    assert count_params(built.model) == 15_738


def test_l1_individual_is_the_l1_students_mask():
    teacher = make_teacher("lenet5", 1)
    segs = evo.segments(teacher, 0.5, example(1))
    mask = evo.l1_individual(teacher, segs)
    _, lineage = build_pruned(teacher, "pruned:l1:0.5", example(1))
    for s in segs:
        assert [c for c in range(s.channels) if mask[s.offset + c]] == list(lineage.kept_channels[s.name]), s.name
