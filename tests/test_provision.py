"""Cells that cannot lie: what a method can reach, the validation split, provenance in the cell id, saved students."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.data import ImageData, carve_validation, load_dataset, task_data
from bench.grid import Provenance, expand, load_grid
from bench.method import DataAccess, DataAccessError
from tests.helpers import make_ctx

REPO = Path(__file__).resolve().parents[1]

SEARCH_PLUGIN = '''
import types
import torch
from torch import nn
from bench.method import DataAccess, Method, MethodConfig, TeacherAccess, register


def reachable_tensors(*roots, limit=200000):
    """Every tensor reachable from the roots through attributes, containers, closures, bound methods and
    generator frames (not through modules' globals)."""
    seen, found, stack = set(), [], list(roots)
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, str, bytes, int, float, bool)) or obj is None:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            found.append(obj)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys()); stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, types.MethodType):
            stack.extend([obj.__self__, obj.__func__])
        elif isinstance(obj, types.FunctionType):
            stack.extend(c.cell_contents for c in (obj.__closure__ or ()) if c.cell_contents is not None)
            stack.extend(obj.__defaults__ or ()); stack.extend((obj.__kwdefaults__ or {}).values())
        elif isinstance(obj, types.GeneratorType):
            if obj.gi_frame is not None:
                stack.extend(obj.gi_frame.f_locals.values())
        if hasattr(obj, "__dict__") and not isinstance(obj, types.FunctionType):
            stack.append(vars(obj))
        for slot in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, slot):
                stack.append(getattr(obj, slot))
    return found


def images_in(tensors, shape):
    return [t for t in tensors if t.dim() >= 3 and tuple(t.shape[-3:]) == shape and t.shape[0] > 8]


class Searcher(Method):
    def distill(self, teacher, student, ctx):
        for step in ctx.steps(2, "search"):
            found = images_in(reachable_tensors(ctx, teacher, student), ctx.input_shape)
            if found:
                raise RuntimeError(f"found {len(found)} image tensors: {[tuple(t.shape) for t in found][:5]}")
        return student


@register("search_none")
class SearchNone(Searcher):
    data_access = DataAccess.NONE


@register("search_full")
class SearchFull(Searcher):
    """The control: a FULL method's context holds the training split, so the same search must find it."""
    data_access = DataAccess.FULL

    def distill(self, teacher, student, ctx):
        ctx.train_data()
        return super().distill(teacher, student, ctx)
'''

GRID = """
name: prov
datasets: [digits]
pairs: [{teacher: lenet5, student: lenet5_half}]
methods: [{name: kd_noise, budget: 0.002}]
seeds: [0]
teacher_recipe: {digits: {epochs: 15}}
"""


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "runs.csv", newline="") as f:
        return {r["method"] + r.get("label", ""): r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_a_data_free_plugin_searching_everything_it_is_handed_finds_no_real_image(tmp_path, cache_dir):
    plugin = tmp_path / "searcher.py"
    plugin.write_text(SEARCH_PLUGIN)
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.replace("methods: [{name: kd_noise, budget: 0.002}]", "methods: [search_none, search_full]")
                    + f"plugins: [{plugin}]\n")
    out = tmp_path / "results"
    result = _run(["run", "--grid", str(grid), "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress",
                   "--no-report"])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in _rows(out).values()}
    assert rows["search_none"]["status"] == "ok", rows["search_none"]["error"]
    assert rows["search_none"]["real_samples_used"] == "0"
    # the control proves the search can find images: the FULL context holds the training split
    assert rows["search_full"]["status"] == "failed" and "found" in rows["search_full"]["error"]
    assert "(1150, 1, 32, 32)" in rows["search_full"]["error"]  # the training split only: no validation, no test


def test_alternative_data_from_the_tasks_own_source_is_refused(tmp_path):
    root = os.environ.get("DFKD_DATA_ROOT")
    if not (root and (Path(root) / "mnist-t10k").is_dir()):
        pytest.skip("needs the official MNIST test files: shared/data/mnist-t10k absent (DFKD_DATA_ROOT)")
    mnist = task_data("mnist_5k")
    ctx = make_ctx(mnist, DataAccess.ALT, tmp_path)
    with pytest.raises(DataAccessError, match="teacher's own source 'mnist'"):
        ctx.alt_images("mnist_t10k")  # MNIST's test images are MNIST too
    digits = task_data("digits")
    images = make_ctx(digits, DataAccess.ALT, tmp_path).alt_images("mnist_t10k")  # another source: allowed
    assert images.shape == (10000, 1, 32, 32)


def test_a_data_free_method_gets_no_labelled_feedback(digits, teacher, tmp_path):
    """ctx.evaluate returns None to a method that did not declare validation_feedback; a paper protocol's
    best-on-test and the anytime curve are still recorded by the harness."""
    from bench.method import Method
    from bench.metrics import evaluate_accuracy
    from bench.models import create_model
    from bench.transforms import to_float
    from tests.helpers import run_distill

    seen = []

    class Peek(Method):
        data_access = DataAccess.NONE
        tracks_best = True

        def distill(self, teacher, student, ctx):
            assert not any(hasattr(ctx, name) for name in ("data", "test_x", "evaluations", "best_acc"))
            for step in ctx.steps(1, "peek"):
                seen.append(ctx.evaluate(student, step))
            return student

    student = create_model("lenet5", 10, 1, 32)
    student.load_state_dict(teacher.model.state_dict())  # a good student: val and test accuracies are meaningful
    outcome = run_distill(Peek(Peek.Config()), teacher.model, student, digits, tmp_path)
    acc = lambda x, y: evaluate_accuracy(student, x, y, lambda xb: to_float(xb, digits.info))  # noqa: E731
    assert seen == [None]
    assert outcome.best_test == pytest.approx(acc(digits.test_x, digits.test_y))
    assert outcome.anytime[-1]["val_acc"] == pytest.approx(acc(digits.val_x, digits.val_y), abs=1e-3)
    assert outcome.real_samples_used == 0
    assert acc(digits.val_x, digits.val_y) != acc(digits.test_x, digits.test_y)  # the two are told apart


def test_a_method_that_declares_validation_feedback_gets_it_and_its_row_counts_the_images(digits, teacher, tmp_path):
    from bench.method import Method
    from bench.metrics import evaluate_accuracy
    from bench.models import create_model
    from bench.transforms import to_float
    from tests.helpers import run_distill

    seen = []

    class Selects(Method):
        data_access = DataAccess.NONE
        validation_feedback = True

        def distill(self, teacher, student, ctx):
            for step in ctx.steps(1, "select"):
                seen.append(ctx.evaluate(student, step))
            return student

    student = create_model("lenet5", 10, 1, 32)
    student.load_state_dict(teacher.model.state_dict())
    outcome = run_distill(Selects(Selects.Config()), teacher.model, student, digits, tmp_path)
    acc = evaluate_accuracy(student, digits.val_x, digits.val_y, lambda xb: to_float(xb, digits.info))
    assert seen == [pytest.approx(acc)]
    assert outcome.real_samples_used == digits.val_x.shape[0]


def _reachable(root, depth=3, private=False):
    """Every object reachable from ``root`` through public attributes (names without a leading underscore;
    every name with ``private``), dict values and list items, ``depth`` levels deep."""
    import types

    seen, frontier = {}, [root]
    for level in range(depth + 1):
        following = []
        for obj in frontier:
            if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
                continue
            if level and isinstance(obj, types.ModuleType) and obj.__name__.split(".")[0] not in ("bench", "methods"):
                continue  # torch, numpy, ...: not the harness's
            seen[id(obj)] = obj
            if isinstance(obj, dict):
                following += [v for k, v in obj.items() if not str(k).startswith("_")]
            elif isinstance(obj, (list, tuple, set)):
                following += list(obj)[:50]
            elif not isinstance(obj, torch.Tensor):
                names = dir(obj) + list(getattr(type(obj), "__slots__", ()))
                for name in names:
                    if name.startswith("__") or (name.startswith("_") and not private):
                        continue
                    try:
                        following.append(getattr(obj, name))
                    except Exception:
                        pass
        frontier = following
    return list(seen.values())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_plugin_that_searches_the_public_modules_for_an_evaluator_finds_none(digits, teacher, tmp_path):
    """From inside distill(), nothing public (the context, the teacher view, the active monitor, the public
    globals of every bench and methods module) leads to the validation or test images, to a callable that
    scores a student on them, or to the anytime curve's validation accuracies."""
    import sys

    from bench import monitor
    from bench.method import Method
    from bench.models import create_model
    from tests.helpers import run_distill

    found, control = [], []

    class Searcher(Method):
        data_access = DataAccess.NONE
        tracks_best = True

        def distill(self, teacher, student, ctx):
            for step in ctx.steps(2, "search"):
                pass
            modules = [m for name, m in list(sys.modules.items()) if name.split(".")[0] in ("bench", "methods")]
            roots = [ctx, teacher, monitor.active(), *modules]
            held = {id(t) for t in (digits.val_x, digits.test_x, digits.val_y, digits.test_y)}
            for root in roots:
                for obj in _reachable(root):
                    if isinstance(obj, torch.Tensor) and id(obj) in held:
                        found.append(("split", root))
                    if isinstance(obj, dict) and isinstance(obj.get("val_acc"), float) and "teacher_queries" in obj:
                        found.append(("curve", root))  # an anytime point
                    if callable(obj) and getattr(obj, "__name__", "") == "<lambda>" \
                            and getattr(obj, "__module__", "") in ("bench.provision", "bench.monitor"):
                        found.append(("evaluator", root))  # the harness's closures over the splits
            # the same search through private attributes too does reach the splits: it is a real search
            control.append(any(id(o) in held for o in _reachable(monitor.active(), private=True)))
            return student

    student = create_model("lenet5", 10, 1, 32)
    outcome = run_distill(Searcher(Searcher.Config()), teacher.model, student, digits, tmp_path)
    assert outcome.anytime  # the harness did evaluate (the curve exists) ...
    assert found == []  # ... and the method reached none of it
    assert control == [True]


def test_the_validation_split_is_held_out_stratified_and_fixed():
    base = load_dataset("digits")
    data = task_data("digits")
    assert data.val_x.shape[0] == 287 and data.train_x.shape[0] + 287 == base.train_x.shape[0]
    assert data.info.train_size == data.train_x.shape[0]
    counts = torch.bincount(data.val_y, minlength=10)
    assert int(counts.max() - counts.min()) <= 1  # stratified
    again = carve_validation(base, 287)
    assert torch.equal(again.val_x, data.val_x)  # carved once, the same for every cell
    none = task_data("digits", validation=0)
    assert none.val_x.shape[0] == 0 and none.train_x.shape[0] == base.train_x.shape[0]
    # disjoint: images numbered by their first pixels come out in exactly one of the two splits
    ids = torch.arange(200)
    x = torch.zeros(200, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = ids % 256, ids // 256
    numbered = ImageData(base.info, x, ids % 10, x[:10], ids[:10] % 10)
    carved = carve_validation(numbered, 40)
    number = lambda t: set((t[:, 0, 0, 0].long() + 256 * t[:, 0, 0, 1].long()).tolist())  # noqa: E731
    assert not number(carved.val_x) & number(carved.train_x) and len(number(carved.val_x) | number(carved.train_x)) == 200


def _ids(grid_path: Path) -> dict[str, str]:
    return {c.method: c.cell_id for c in expand(load_grid(str(grid_path)), provenance=Provenance("cpu"))}


def test_editing_a_methods_source_changes_exactly_its_cell_ids(tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.py").write_text(
            "from bench.method import DataAccess, Method, register\n"
            f"@register('{name}')\nclass M(Method):\n    data_access = DataAccess.NONE\n"
            "    def distill(self, teacher, student, ctx):\n        return student\n")
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.replace("methods: [{name: kd_noise, budget: 0.002}]", "methods: [alpha, beta, kd_noise]")
                    + f"plugins: [{tmp_path / 'alpha.py'}, {tmp_path / 'beta.py'}]\n")
    before = _ids(grid)
    source = (tmp_path / "alpha.py").read_text()
    (tmp_path / "alpha.py").write_text(source + "# a comment changes nothing\n")
    assert _ids(grid) == before
    (tmp_path / "alpha.py").write_text(source.replace("return student", "student.eval()\n        return student"))
    after = _ids(grid)
    assert after["alpha"] != before["alpha"] and after["beta"] == before["beta"] and after["kd_noise"] == before["kd_noise"]


def test_a_changed_checkpoint_at_the_same_path_is_a_new_cell(tmp_path):
    from bench.models import create_model

    ckpt = tmp_path / "teacher.pt"
    torch.save(create_model("lenet5", 10, 1, 32).state_dict(), ckpt)
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.replace("{teacher: lenet5, student: lenet5_half}",
                                 f"{{teacher: lenet5, student: lenet5_half, teacher_checkpoint: {ckpt}}}"))
    first = _ids(grid)
    torch.save(create_model("lenet5", 10, 1, 32).state_dict(), ckpt)  # other weights, same path
    assert _ids(grid)["kd_noise"] != first["kd_noise"]


def test_latency_threads_and_validation_are_part_of_the_identity(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    base = _ids(grid)["kd_noise"]
    for extra in ("latency_threads: 2\n", "validation: 100\n"):
        grid.write_text(GRID + extra)
        assert _ids(grid)["kd_noise"] != base, extra


@pytest.mark.slow
def test_saved_students_reproduce_the_row_and_record_weights_access(tmp_path, cache_dir):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.replace("pairs: [{teacher: lenet5, student: lenet5_half}]",
                                 "pairs: [{teacher: lenet5, student: lenet5_half}, {teacher: lenet5, student: 'pruned:l1:0.5'}]")
                    .replace("methods: [{name: kd_noise, budget: 0.002}]",
                             "methods: [{name: kd_noise, budget: 0.002}, {name: student_only, budget: 0.05}]"))
    out = tmp_path / "results"
    result = _run(["run", "--grid", str(grid), "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress",
                   "--no-report"])
    assert result.exit_code == 0, result.output
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    access = {(r["student"], r["method"]): r["teacher_access"] for r in rows}
    assert access[("pruned:l1:0.5", "student_only")] == "weights"  # starts from the teacher's weights
    assert access[("lenet5_half", "student_only")] == "none"
    for r in rows:
        assert r["git_dirty"] in ("True", "False") and r["validation"] == "287" and r["student_acc_val"]
        cell = out / "cells" / r["cell_id"]
        assert torch.load(cell / "student.pt", weights_only=True)  # a plain state dict
        printed = _run(["evaluate", str(cell)]).output
        reported = float(printed.split("test accuracy ")[1].split("%")[0])
        assert abs(reported - float(r["student_acc"])) <= 0.01, printed
    # latency once per architecture: lenet5_half and the 50%-pruned LeNet-5 are the same architecture
    assert len({r["arch_id"] for r in rows}) == 1 and len({r["latency_ms"] for r in rows}) == 1
    assert json.loads((out / "latency.json").read_text())


def test_bench_evaluate_explains_a_folder_that_is_not_a_cell(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2 and "not a cell folder" in result.output
