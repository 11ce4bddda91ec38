"""A user's own teacher and data: checkpoints as libraries write them, image folders at their own size,
`bench distill` (one cell, resumable), `--set`, `bench run --dry-run`, `bench reproduce`, `bench export`."""
from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.data import task_data
from bench.teachers import CheckpointError, get_teacher

FIXTURE = Path(__file__).parent / "fixtures" / "runs_small.csv"
CPU = torch.device("cpu")


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def timm():
    from bench._vision import import_timm

    return import_timm()


@pytest.fixture(scope="module")
def digits48():
    """sklearn's digits presented at 48 px (DataOptions.image_size): a timm teacher's own input size."""
    return task_data("digits", options={"image_size": 48})


def _same_logits(wrapper, original, shape):
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((wrapper(x) - original.eval()(x)).abs().max())


# ------------------------------------------------------------------------------------------ checkpoints
def test_timm_state_dict_loads_as_teacher(timm, digits48, tmp_path, one_thread):
    """timm's own state dict (conv1.0.weight, fc.weight ...) loads into timm:<name> (model.conv1.0.weight ...)."""
    original = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    path = tmp_path / "test_resnet.pth"
    torch.save(original.state_dict(), path)
    assert next(iter(torch.load(path, weights_only=True))).startswith("conv1.")  # the library's key names
    teacher = get_teacher("digits", "timm:test_resnet", digits48, CPU, checkpoint=str(path))
    assert _same_logits(teacher.model, original, (1, 48, 48)) == 0.0
    assert teacher.meta["key_layout"] == "TimmClassifier's library key names"
    assert 0 <= teacher.accuracy <= 100


def test_dataparallel_and_torchvision_state_dicts_load(digits48, tmp_path, one_thread):
    from bench._vision import import_torchvision

    original = import_torchvision().models.resnet18(num_classes=10)
    original.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # grey input, as ours
    path = tmp_path / "dp.pth"
    torch.save(torch.nn.DataParallel(original).state_dict(), path)  # keys module.conv1.weight ..., module.fc.weight
    teacher = get_teacher("digits", "torchvision:resnet18", digits48, CPU, checkpoint=str(path))
    assert _same_logits(teacher.model, original, (1, 48, 48)) == 0.0
    assert "module." in teacher.meta["key_layout"]


def test_pickled_module_is_refused_with_how_to_save_a_state_dict(timm, digits48, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(timm.create_model("test_resnet", num_classes=10, in_chans=1), path)
    with pytest.raises(CheckpointError) as info:
        get_teacher("digits", "timm:test_resnet", digits48, CPU, checkpoint=str(path))
    message = str(info.value)
    assert "pickled Python object" in message and "timm.models.resnet.ResNet" in message
    assert "torch.save(model.state_dict()" in message and "weights_only=True" in message


def test_a_checkpoint_that_does_not_fit_names_the_keys(timm, digits48, tmp_path):
    path = tmp_path / "five_classes.pth"
    torch.save(timm.create_model("test_resnet", num_classes=5, in_chans=1).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatch \['model.fc.weight: checkpoint \(5, 96\) vs model \(10, 96\)"):
        get_teacher("digits", "timm:test_resnet", digits48, CPU, checkpoint=str(path))
    path = tmp_path / "other_arch.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=10, in_chans=1).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        get_teacher("digits", "timm:test_resnet", digits48, CPU, checkpoint=str(path))
    assert "missing keys ['model." in str(info.value) and "unexpected keys ['model." in str(info.value)


def test_pretrained_weights_of_another_task_start_the_teacher(timm, tmp_path):
    """teacher_pretrained: 1000-class RGB weights into a 10-class grey model; head re-initialised, stem summed."""
    from bench.models import create_model
    from bench.teachers import load_pretrained

    imagenet_like = timm.create_model("test_resnet")  # 1000 classes, 3 channels, as ImageNet weights are
    file = tmp_path / "pretrained.pth"
    torch.save(imagenet_like.state_dict(), file)
    model = create_model("timm:test_resnet", 10, 1, 48)
    adapted = load_pretrained(model, file)
    assert adapted["reinitialised"] == ["model.fc.weight", "model.fc.bias"]
    assert adapted["summed_channels"] == ["model.conv1.0.weight"]
    assert torch.equal(model.model.conv1[0].weight, imagenet_like.conv1[0].weight.sum(1, keepdim=True))
    assert torch.equal(model.model.layer1[0].conv1.weight, imagenet_like.layer1[0].conv1.weight)


# ------------------------------------------------------------------------------- image folder, distill
def write_digit_folder(root: Path, per_class_train: int = 30, per_class_test: int = 8) -> Path:
    """sklearn's real 8x8 digits written as PNG files in torchvision's ImageFolder layout."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    counts: dict[tuple[str, int], int] = {}
    for image, label in zip(bunch.images, bunch.target):
        for split, limit in (("train", per_class_train), ("test", per_class_test)):
            if counts.get((split, label), 0) < limit:
                counts[(split, label)] = counts.get((split, label), 0) + 1
                folder = root / split / f"digit_{label}"
                folder.mkdir(parents=True, exist_ok=True)
                pixels = np.rint(image * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{counts[(split, label)]:03d}.png")
                break
    return root


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, cache_dir):
    """One `bench distill` call on an image folder of PNGs read at 48 px, with a timm teacher's state dict."""
    from bench._vision import import_timm

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("user")
    folder = write_digit_folder(root / "digits_png")
    torch.manual_seed(0)
    teacher = import_timm().create_model("test_resnet", num_classes=10, in_chans=1)
    torch.save(teacher.state_dict(), root / "teacher.pth")
    args = ["distill", "--dataset", f"imagefolder:{folder}", "--teacher", "timm:test_resnet",
            "--teacher-checkpoint", root / "teacher.pth", "--student", "wrn_16_1", "--method", "kd",
            "--set", "image_size=48 augment=crop_flip", "--set", "budget.student_steps=3", "--set", "batch_size=32",
            "--out", root / "results", "--cache-dir", cache_dir, "--device", "cpu", "--no-progress"]
    first = _invoke(*args)
    return {"args": args, "first": first, "out": root / "results", "folder": folder}


@pytest.mark.slow
def test_distill_on_an_image_folder_writes_the_row_and_the_student_then_resumes(distilled):
    first = distilled["first"]
    assert first.exit_code == 0, first.output
    rows = list(csv.DictReader((distilled["out"] / "runs.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    row = rows[0]
    assert row["input_shape"] == "[1, 48, 48]" and row["augment"] == "crop_flip"
    assert json.loads(row["data_options"]) == {"augment": "crop_flip", "image_size": 48}
    assert row["teacher_checkpoint"].endswith("teacher.pth") and row["student_steps"] == "3"
    assert len(json.loads(row["input_mean"])) == 1  # computed from the folder's training split
    cell = distilled["out"] / "cells" / row["cell_id"]
    assert (cell / "student.pt").is_file() and str(cell / "student.pt") in first.output
    assert f"student accuracy {row['student_acc']}%" in first.output and "(ran)" in first.output

    again = _invoke(*distilled["args"])
    assert again.exit_code == 0, again.output
    assert "already finished: nothing re-run" in again.output and row["cell_id"] in again.output
    after = list(csv.DictReader((distilled["out"] / "runs.csv").open()))
    assert [r["finished"] for r in after] == [row["finished"]]  # the same row, not a re-run

    evaluated = _invoke("evaluate", cell, "--device", "cpu")
    assert evaluated.exit_code == 0 and f"test accuracy {float(row['student_acc']):.3f}%" in evaluated.output


@pytest.mark.slow
def test_torchscript_export_gives_the_students_logits(distilled, tmp_path):
    from bench.runner import load_saved_student

    assert distilled["first"].exit_code == 0, distilled["first"].output
    row = next(csv.DictReader((distilled["out"] / "runs.csv").open()))
    cell = distilled["out"] / "cells" / row["cell_id"]
    out = tmp_path / "student.ts"
    result = _invoke("export", cell, "--format", "torchscript", "--out", out)
    assert result.exit_code == 0, result.output
    assert "max abs logit diff" in result.output and "-> ok" in result.output
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["input_shape"] == [None, 1, 48, 48] and meta["mean"] == json.loads(row["input_mean"])
    data = task_data(f"imagefolder:{distilled['folder']}", options={"image_size": 48, "augment": "crop_flip"})
    x = (data.test_x.float() / 255 - torch.tensor(meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(meta["std"]).view(1, -1, 1, 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        assert torch.allclose(torch.jit.load(str(out))(x), load_saved_student(cell)(x), atol=1e-5)


def test_onnx_export_without_onnx_says_how_to_install(distilled, tmp_path, monkeypatch):
    import importlib.util

    row = next(csv.DictReader((distilled["out"] / "runs.csv").open()))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    result = _invoke("export", distilled["out"] / "cells" / row["cell_id"], "--format", "onnx", "--out", tmp_path / "s.onnx")
    assert result.exit_code == 2 and "pip install onnx onnxruntime" in result.output and "Traceback" not in result.output


def test_distill_set_with_an_unknown_key_lists_the_valid_ones(tmp_path):
    result = _invoke("distill", "--dataset", "digits", "--teacher", "lenet5", "--student", "lenet5_half",
                     "--method", "kd", "--set", "learning_rate=0.1", "--out", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown key 'learning_rate'" in result.output
    for valid in ("method fields (kd):", " lr,", "temperature", "cell settings: budget", "validation",
                  "latency_threads", "data options: image_size"):
        assert valid in result.output, valid
    typed = _invoke("distill", "--dataset", "digits", "--teacher", "lenet5", "--student", "lenet5_half",
                    "--method", "kd", "--set", "lr=fast", "--out", tmp_path)
    assert typed.exit_code == 2 and "lr: expected a number, got 'fast'" in typed.output
    assert not (tmp_path / "runs.csv").exists()


def test_imagefolder_size_and_normalisation(tmp_path):
    folder = write_digit_folder(tmp_path / "png", per_class_train=5, per_class_test=2)
    small = task_data(f"imagefolder:{folder}")
    big = task_data(f"imagefolder:{folder}", options={"image_size": 48, "mean": [0.5], "std": [0.25]})
    assert small.info.image_size == 32 and tuple(big.train_x.shape[1:]) == (1, 48, 48)
    assert big.info.mean == (0.5,) and big.info.std == (0.25,)
    train = small.train_x.double() / 255  # the folder's own normalisation comes from its training split
    assert small.info.mean[0] == pytest.approx(float(torch.cat([train, small.val_x.double() / 255]).mean()), abs=1e-3)


# ------------------------------------------------------------------------------------ bench run options
def test_dry_run_lists_cells_and_writes_nothing(tmp_path):
    out = tmp_path / "results" / "smoke"
    result = _invoke("run", "--grid", "smoke", "--only", "kd,dafl", "--seeds", "0,1", "--budget", "seconds=5",
                     "--dry-run", "--out", out, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    from bench import overrides
    from bench.grid import expand, load_grid

    expected = expand(overrides.only(load_grid("smoke"), ["kd", "dafl"]))
    assert len({c.seed for c in expected}) == 1  # the smoke grid's one seed; --seeds 0,1 doubles the cells
    lines = [line for line in result.output.splitlines() if line[:12].strip() and len(line) > 60 and "digits" in line]
    assert len(lines) == 2 * len(expected) and all("seconds=5" in line for line in lines)
    assert "to train" in result.output and "nothing was run or written" in result.output
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_dry_run_estimates_a_longer_seconds_cap_from_rows_that_hit_a_shorter_one():
    """Rows that stopped at a 45 s cap say nothing of a 600 s cell's length: the estimate is the 600 s cap."""
    from bench import overrides
    from bench.dryrun import estimate_seconds
    from bench.grid import expand, load_grid

    cell = next(c for c in expand(overrides.only(load_grid("smoke"), ["dafl"])))
    row = {"method": cell.method, "dataset": cell.dataset, "teacher": cell.teacher, "student": cell.student,
           "budget": "1", "compute_cap": "seconds=45", "distill_seconds": "45.3", "stopped_by": "seconds"}
    longer = dataclasses.replace(cell, budget={**cell.budget, "seconds": 600})
    assert estimate_seconds(longer, [row])[0] == 600
    unfinished = {**row, "compute_cap": "", "distill_seconds": "30", "stopped_by": ""}   # ran its schedule in 30 s: 30 s again
    assert estimate_seconds(longer, [unfinished])[0] == 30


def test_run_set_applies_to_every_entry_that_has_the_field(tmp_path):
    from bench import overrides
    from bench.grid import load_grid

    grid = overrides.apply(load_grid("smoke"), overrides.parse_assignments(["temperature=2", "budget.seconds=3"]))
    with_t = [e for e in grid.methods if "temperature" in e.params]
    assert with_t and all(e.params["temperature"] == 2 for e in with_t)
    assert grid.budget.seconds == 3 and all(e.budget is None or e.budget.seconds == 3 for e in grid.methods)
    bad = _invoke("run", "--grid", "smoke", "--only", "nosuch", "--dry-run", "--out", tmp_path)
    assert bad.exit_code == 2 and "unknown method entries ['nosuch']; valid: kd" in bad.output


# -------------------------------------------------------------------------------------------- reproduce
def test_reproduce_prints_the_paper_tables_with_not_run_rows(distilled, tmp_path):
    result = _invoke("reproduce", "--results", distilled["out"], "--data-root", tmp_path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "DAFL (Chen et al., ICCV 2019) Table 1" in out and "| Data-free learning (DAFL) | dafl | 98.20 | not run |" in out
    assert "DataFree library" in out and "94.84" in out
    assert "cifar-10-batches-py" in out  # which CIFAR-10 files are missing, and where they go


def test_reproduce_puts_our_rows_beside_the_paper(tmp_path):
    """Our numbers: mean +- std over the seeds of the matching ok rows (here the report fixture's real rows)."""
    from bench.reproduce import load_papers, render

    papers = tmp_path / "papers.yaml"
    papers.write_text("tables:\n  - {id: t, title: T, source: S, protocol: final, defaults: {dataset: fashion_mnist, "
                      "teacher: lenet5, student: lenet5_half}, rows: [{label: KD, method: kd, paper: 90.0}, "
                      "{label: Teacher, method: teacher, paper: 91.0}]}\n")
    rows = [r for r in csv.DictReader(FIXTURE.open()) if r["status"] == "ok"]
    text = render(load_papers(papers), rows, [FIXTURE.parent])
    kd = [float(r["student_acc"]) for r in rows if r["method"] == "kd" and r["student"] == "lenet5_half"
          and r["dataset"] == "fashion_mnist"]
    assert f"| KD | kd | 90.00 | {np.mean(kd):.2f} ± {np.std(kd, ddof=1):.2f} |" in text
    assert "| 10% |" in text and "| Teacher | teacher | 91.00 | 90.41 |" in text


def test_papers_file_is_valid_and_cites_every_table():
    from bench.reproduce import load_papers

    tables = load_papers()
    assert {t.id for t in tables} >= {"dafl-table1", "dafl-table3-cifar10", "dafl-table3-cifar100", "datafree-cifar10"}
    assert all(t.source and t.rows for t in tables)
    dafl = next(t for t in tables if t.id == "dafl-table1")
    assert [(r.method, r.paper) for r in dafl.rows][-1] == ("dafl", 98.20)


def test_new_commands_have_help_with_examples():
    for command in ("distill", "reproduce", "export"):
        result = _invoke(command, "--help")
        assert result.exit_code == 0 and "Examples:" in result.output, command


def test_dry_run_inspects_a_cached_teachers_seeded_students(tmp_path):
    """With the teacher cached, the dry run looks up derived students, including seeded (evolutionary) ones."""
    from bench.dryrun import student_state
    from bench.grid import expand, load_grid
    from bench.pruning import cache_folder
    from bench.runner import RunOptions

    cells = list({c.student: c for c in expand(load_grid("smoke")) if c.student.startswith("pruned:")}.values())
    assert {c.student.split(":")[1] for c in cells} == {"l1", "evo"}
    options = RunOptions(out=tmp_path / "out", device=torch.device("cpu"), cache_dir=tmp_path / "cache")
    for cell in cells:
        assert student_state(cell, "cached (abc123)", options) == "to derive"
        ctx = type("Ctx", (), {"cache_dir": tmp_path / "cache", "teacher_key": "abc123", "seed": cell.teacher_seed})
        folder = cache_folder(ctx, cell.student)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "arch.json").write_text("{}")
        assert student_state(cell, "cached (abc123)", options) == "cached"
