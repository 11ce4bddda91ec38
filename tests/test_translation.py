"""The translation task (issue 23): CycleGAN teacher, generator pruning, co-evolution, scores, grid cells.

Real data only: scikit-learn's digits (always here) and the official MNIST files (skipped without them).
"""
from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError
from bench.data import DatasetMissingError, task_data
from bench.metrics import count_params
from bench.translation import cyclegan as cg
from bench.translation.coevolution import CoevolutionSettings, Judge, coevolve
from bench.translation.prune import keep_count, l1_masks, prune, segments


@pytest.fixture(scope="module")
def mnist():
    try:
        return task_data("mnist")
    except DatasetMissingError as exc:
        pytest.skip(f"the official MNIST files are not here: {exc}")


def tiny(width: int = 4, blocks: int = 1, seed: int = 0) -> cg.CycleGAN:
    model = cg.build(cg.CycleGANConfig(width=width, blocks=blocks, disc_width=4))
    gen = torch.Generator().manual_seed(seed)
    for m in (model.g_ab, model.g_ba, model.d_a, model.d_b):
        cg.init_weights(m, gen)
    return model


def test_tiny_cyclegan_cycle_loss_falls(digits, mnist, one_thread):
    config = cg.CycleGANConfig(width=4, blocks=1, disc_width=4, steps=40, batch_size=4)
    model = tiny()
    a, b = cg.to_unit(digits.test_x[:64]), cg.to_unit(mnist.test_x[:64])

    def cycle() -> float:
        with torch.no_grad():
            return float(cg.generator_losses(model, a, b, config)["cycle"])

    before = cycle()
    cg.train(model, digits.train_x, mnist.train_x, config, seed=0)
    after = cycle()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_coevolution_returns_masks_with_the_ratio_for_both_generators(ratio, one_thread):
    model = tiny(width=8)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    found = coevolve(model.g_ab, model.g_ba, model.d_a, model.d_b, x, x.flip(0), ratio, seed=0,
                     settings=CoevolutionSettings(population=4, generations=2, n_images=4))
    for mask in (found.mask_ab, found.mask_ba):
        assert mask.dtype == torch.bool and mask.numel() == sum(model.g_ab.widths)
        for s in found.segments:
            assert int(mask[s.offset:s.offset + s.channels].sum()) == keep_count(s.channels, ratio)
    assert [keep_count(c, ratio) for c in model.g_ab.widths] == [s.keep for s in found.segments]
    assert len(found.history["best_fitness_ab"]) == 3 and found.generator_queries > 0 and found.discriminator_queries > 0


def _kill_filters(g: cg.Generator, mask: torch.Tensor, segs) -> None:
    """Zero the weights and biases of every filter ``mask`` removes: those filters then output zero channels."""
    writers = {"c1": [(g.c1, 0)], "d1": [(g.d1, 0)], "u1": [(g.u1, 1)], "u2": [(g.u2, 1)],
               "trunk": [(g.d2, 0)] + [(c, 0) for blk in g.res for c in (blk.conv1, blk.conv2)]}
    with torch.no_grad():
        for s in segs:
            dead = (~mask[s.offset:s.offset + s.channels]).nonzero().flatten()
            for layer, axis in writers[s.name]:
                layer.weight.index_fill_(axis, dead, 0.0)
                layer.bias.index_fill_(0, dead, 0.0)


def test_fitness_prefers_the_mask_that_keeps_the_original_outputs(one_thread):
    # Constructed case: the filters outside `keep` are dead (all-zero weights), so pruning them changes
    # nothing: by hand, that mask's discriminator term is exactly 0 and its cycle term is the original's;
    # a random mask of the same counts removes live filters and its discriminator term is > 0.
    model = tiny(width=8, seed=1)
    segs = segments(model.g_ab, 0.5)
    gen = torch.Generator().manual_seed(3)
    from bench.evolution import random_population

    keep, other = random_population(2, segs, gen)
    _kill_filters(model.g_ab, keep, segs)
    x = torch.rand(6, 1, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(prune(model.g_ab, keep, segs).eval()(x), model.g_ab.eval()(x), atol=1e-5)
    settings = CoevolutionSettings()
    judge = Judge(model.g_ab, model.d_b, x, segs, settings)
    losses = judge.losses(torch.stack([keep, other]), None)
    assert float(losses[0]) < 1e-9 < float(losses[1])
    fitness = judge.fitness(torch.stack([keep, other]), None)
    assert fitness[0] > fitness[1]
    with torch.no_grad():  # with a partner: the kept mask's loss is the original generator's cycle term
        partner = model.g_ba.eval()
        original = settings.lambda_cycle * (partner(model.g_ab(x)) - x).abs().flatten(1).mean(1).sum()
    assert float(judge.losses(keep[None], partner)[0]) == pytest.approx(float(original), rel=1e-4)


def _hand_count(widths, blocks: int) -> int:
    c1, d1, t, u1, u2 = widths
    return (49 * c1 + c1) + (9 * c1 * d1 + d1) + (9 * d1 * t + t) + blocks * 2 * (9 * t * t + t) + \
        (9 * t * u1 + u1) + (9 * u1 * u2 + u2) + (49 * u2 + 1)


def test_pruned_generator_has_the_reported_params_and_the_same_output_shape(one_thread):
    model = tiny(width=8, blocks=2)
    segs = segments(model.g_ab, 0.5)
    mask = l1_masks(model.g_ab, segs)
    pruned = prune(model.g_ab, mask, segs)
    assert pruned.widths == (4, 8, 16, 8, 4)
    assert count_params(pruned) == _hand_count(pruned.widths, 2) < count_params(model.g_ab) == _hand_count((8, 16, 32, 16, 8), 2)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out = pruned.eval()(x)
        _kill_filters(model.g_ab, mask, segs)  # the pruned generator computes the full one with those filters zeroed
        reference = model.g_ab.eval()(x)
    assert out.shape == x.shape == reference.shape
    assert torch.allclose(out, reference, atol=1e-5)
    with pytest.raises(ValueError, match="ratio"):
        segments(model.g_ab, 1.5)


# the classifiers behind class preservation and the Frechet distance: 600 Adam steps of LeNet-5 (harness cache)
@pytest.mark.parametrize("dataset,least", [("digits", 0.90), ("mnist", 0.95)])
def test_classifiers_reach_the_stated_accuracy_on_their_test_split(dataset, least, cache_dir, data_root, one_thread):
    from bench.translation.scores import ClassifierConfig, get_classifier

    if dataset == "mnist":
        try:
            task_data("mnist", data_root)
        except DatasetMissingError as exc:
            pytest.skip(str(exc))
    model, acc = get_classifier(dataset, ClassifierConfig(steps=600), cache_dir, data_root)
    assert acc >= least, acc
    again, acc2 = get_classifier(dataset, ClassifierConfig(steps=600), cache_dir, data_root)  # from the cache
    assert acc2 == acc


GRID = """
name: tiny_translation
task: translation
domains: [{a: digits, b: mnist}]
generators: [{width: 2, blocks: 1}]
methods:
  - gan_uncompressed
  - {name: gan_l1, params: {finetune_steps: 4}}
ratios: [0.5]
seeds: [0]
cyclegan: {steps: 10, disc_width: 2}
classifier: {steps: 20}
eval_images: 40
"""


def test_translation_grid_of_two_cells_runs_and_resumes(tmp_path, cache_dir, data_root, mnist, one_thread):
    from bench.grid import load_grid
    from bench.store import ResultsStore
    from bench.translation import report
    from bench.translation.task import COLUMNS, TranslationGrid, run_translation_grid

    path = tmp_path / "tiny.yaml"
    path.write_text(GRID)
    grid = load_grid(str(path))
    assert isinstance(grid, TranslationGrid)
    out = tmp_path / "out"
    first = run_translation_grid(grid.__class__(**{**grid.__dict__, "methods": grid.methods[:1]}), out,
                                 data_root=data_root, cache_dir=cache_dir, latency_min_run_time=0.05, log=lambda m: None)
    assert len(first.done) == 1 and first.failed == 0
    second = run_translation_grid(grid, out, data_root=data_root, cache_dir=cache_dir, latency_min_run_time=0.05,
                                  log=lambda m: None)
    assert (len(second.done), second.skipped, second.failed) == (1, 1, 0)  # resumed: only the missing cell ran
    rows = list(ResultsStore(out, columns=COLUMNS).rows.values())
    assert {r["method"] for r in rows} == {"gan_uncompressed", "gan_l1"} and all(r["status"] == "ok" for r in rows)
    for r in rows:
        for column in ("class_pres_ab", "class_pres_ba", "frechet_ab", "cycle_l1_a", "params", "macs", "latency_ms"):
            assert r[column] != "", column
    l1 = next(r for r in rows if r["method"] == "gan_l1")
    full = next(r for r in rows if r["method"] == "gan_uncompressed")
    assert int(l1["params"]) < int(full["params"]) == int(full["teacher_params"])
    third = run_translation_grid(grid, out, data_root=data_root, cache_dir=cache_dir, log=lambda m: None)
    assert (len(third.done), third.skipped) == (0, 2)
    rendered = report.render(out)
    assert (rendered / "plots" / "quality_vs_latency.png").is_file() and "gan_l1" in (rendered / "translation.md").read_text()


def test_translation_grid_errors_name_the_bad_value(tmp_path):
    from bench.grid import load_grid

    path = tmp_path / "bad.yaml"
    path.write_text(GRID.replace("gan_uncompressed", "gan_nope"))
    with pytest.raises(ConfigError, match="gan_nope.*valid: gan_coevolution, gan_l1, gan_uncompressed"):
        load_grid(str(path))
    path.write_text(GRID.replace("task: translation", "task: segmentation"))
    with pytest.raises(ConfigError, match="unknown task 'segmentation'; valid: classification, translation"):
        load_grid(str(path))
    path.write_text(GRID.replace("ratios: [0.5]", "ratios: [1.5]"))
    with pytest.raises(ConfigError, match="ratios"):
        load_grid(str(path))
