from pathlib import Path

import pytest

from bench.config import ConfigError
from bench.grid import expand, list_grids, load_grid
from bench.method import list_methods


def _write(tmp_path, text, name="g.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD = """
name: t
datasets: [digits]
pairs: [{teacher: lenet5, student: lenet5_half}]
methods: [kd, {name: kd_noise, params: {batch_size: 64}}]
seeds: [0, 1]
budget: 0.1
"""


def test_builtin_grids_load():
    assert {"smoke", "quick", "full"} <= set(list_grids())
    for name in ("smoke", "quick", "full"):
        grid = load_grid(name)
        assert expand(grid)


def test_smoke_and_quick_grids_cover_every_builtin_method():
    builtin = {name for name, cls in list_methods().items() if cls.__module__.startswith("methods.")}
    for name in ("smoke", "quick"):
        listed = {m.name for m in load_grid(name).methods}
        assert builtin <= listed, f"{name} grid misses {builtin - listed}"


def test_quick_grids_data_free_block_runs_the_tuned_track():
    """Issue 20: the headline data-free cells run values tuned on MNIST, never on the scored task."""
    from bench.method import DataAccess

    data_free = [c for c in expand(load_grid("quick")) if list_methods()[c.method].data_access is DataAccess.NONE
                 and (c.teacher, c.student) == ("lenet5_bn", "lenet5_half")]
    assert len({c.method for c in data_free}) == 12
    assert {c.tuning for c in data_free} == {"tuned:mnist:16@45s"}


def test_cells_and_ids(tmp_path):
    cells = expand(load_grid(_write(tmp_path, GOOD)))
    assert len(cells) == 4
    assert len({c.cell_id for c in cells}) == 4
    again = expand(load_grid(_write(tmp_path, GOOD)))
    assert [c.cell_id for c in cells] == [c.cell_id for c in again]
    noise = [c for c in cells if c.method == "kd_noise"]
    assert noise[0].params["batch_size"] == 64 and noise[0].params["lr"] == 2e-3
    changed = expand(load_grid(_write(tmp_path, GOOD.replace("batch_size: 64", "batch_size: 32"))))
    assert {c.cell_id for c in changed if c.method == "kd"} == {c.cell_id for c in cells if c.method == "kd"}
    assert not ({c.cell_id for c in changed if c.method == "kd_noise"} & {c.cell_id for c in noise})


def test_a_method_entry_can_turn_amp_on_for_itself_alone(tmp_path):
    text = GOOD.replace("{name: kd_noise, params: {batch_size: 64}}", "{name: kd_noise, amp: true, params: {batch_size: 64}}")
    cells = expand(load_grid(_write(tmp_path, text)))
    assert {c.method: c.amp for c in cells} == {"kd": False, "kd_noise": True}
    plain = {c.cell_id for c in expand(load_grid(_write(tmp_path, GOOD)))}
    assert {c.cell_id for c in cells if c.method == "kd"} <= plain  # the grid default is unchanged
    assert not ({c.cell_id for c in cells if c.method == "kd_noise"} & plain)  # amp is part of the identity
    grid_on_entry_off = expand(load_grid(_write(tmp_path, text.replace("amp: true", "amp: false") + "amp: true\n")))
    assert {c.method: c.amp for c in grid_on_entry_off} == {"kd": True, "kd_noise": False}


@pytest.mark.parametrize("text, needle", [
    (GOOD.replace("[digits]", "[digitz]"), "unknown dataset 'digitz'; valid: "),
    (GOOD.replace("teacher: lenet5,", "teacher: lenet7,"), "unknown teacher model 'lenet7'"),
    (GOOD.replace("student: lenet5_half", "student: lenet5_third"), "unknown student 'lenet5_third'"),
    (GOOD.replace("methods: [kd,", "methods: [kdd,"), "unknown method 'kdd'; registered methods:"),
    (GOOD.replace("batch_size: 64", "batch_size: big"), "methods[1] (kd_noise).params.batch_size: expected an integer, got 'big'"),
    (GOOD.replace("budget: 0.1", "budget: -1"), "budget: fraction must be in (0, 10]"),
    (GOOD.replace("budget: 0.1", "budget: {teacher_querys: 100}"), "unknown key(s) 'teacher_querys'; valid keys: fraction, seconds, student_steps, teacher_queries"),
    (GOOD.replace("budget: 0.1", "budget: {seconds: -5}"), "seconds must be positive"),
    (GOOD.replace("[digits]", "[mnist_t10k]"), "'mnist_t10k' holds only another dataset's test split"),
    (GOOD + "validation: -3\n", "validation must be >= 0"),
    (GOOD.replace("seeds: [0, 1]", "seeds: 0"), "seeds: expected a list, got 0"),
    (GOOD + "colour: red\n", "unknown key(s) 'colour'"),
    ("name: [unclosed\n", "malformed YAML"),
    ("- just\n- a list\n", "a grid must be a mapping"),
    (GOOD.replace("seeds: [0, 1]", "seeds: [0, 0]"), "the same cell more than once"),
])
def test_bad_grids_name_file_key_and_choices(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert needle in str(err.value)
    assert path in str(err.value) or "malformed" not in needle


def test_unknown_grid_name_lists_builtins():
    with pytest.raises(ConfigError, match="unknown grid 'quik'; built-in grids: .*quick"):
        load_grid("quik")


def test_a_pair_can_restrict_its_methods(tmp_path):
    text = GOOD.replace("pairs: [{teacher: lenet5, student: lenet5_half}]",
                        "pairs: [{teacher: lenet5, student: lenet5_half, methods: [kd_noise]}, {teacher: lenet5, student: lenet5}]")
    cells = expand(load_grid(_write(tmp_path, text)))
    assert sorted((c.student, c.method) for c in cells if c.seed == 0) == [
        ("lenet5", "kd"), ("lenet5", "kd_noise"), ("lenet5_half", "kd_noise")]
    with pytest.raises(ConfigError, match=r"pairs\[0\].methods: unknown method entries \['dafl2'\]"):
        load_grid(_write(tmp_path, text.replace("methods: [kd_noise]", "methods: [dafl2]")))


def test_a_pair_can_restrict_its_datasets(tmp_path):
    text = GOOD.replace("datasets: [digits]", "datasets: [digits, mnist_5k]").replace(
        "pairs: [{teacher: lenet5, student: lenet5_half}]",
        "pairs: [{teacher: lenet5, student: lenet5_half, datasets: [mnist_5k]}, {teacher: lenet5, student: lenet5}]")
    cells = expand(load_grid(_write(tmp_path, text)))
    assert sorted({(c.dataset, c.student) for c in cells}) == [
        ("digits", "lenet5"), ("mnist_5k", "lenet5"), ("mnist_5k", "lenet5_half")]
    with pytest.raises(ConfigError, match=r"pairs\[0\].datasets: \['cifar10'\] not in the grid's datasets"):
        expand(load_grid(_write(tmp_path, text.replace("datasets: [mnist_5k]}", "datasets: [cifar10]}"))))


def test_example_study_grids_expand():
    """Every study grid expands, or (one on the tuned or oracle track, before its tune) names the command that tunes."""
    studies = sorted((Path(__file__).resolve().parents[1] / "examples" / "studies").glob("*.yaml"))
    assert studies
    for path in studies:
        try:
            assert expand(load_grid(str(path))), path
        except ConfigError as exc:
            assert "preset: tuned" in path.read_text() or "preset: oracle" in path.read_text(), (path, exc)
            assert "bench tune --grid examples/studies/tune_" in str(exc), exc


def test_the_readme_grid_example_is_valid(tmp_path):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"## Grids\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    cells = expand(load_grid(_write(tmp_path, example)))
    assert {c.method for c in cells if c.student == "lenet5_half"} == {"kd", "kd_alt", "dafl"}


def test_report_budgets_name_an_anytime_axis_and_positive_budgets(tmp_path):
    grid = load_grid(_write(tmp_path, GOOD + "report_budgets: {seconds: [45, 150, 600]}\n"))
    assert grid.report_budgets == {"seconds": [45.0, 150.0, 600.0]}
    with pytest.raises(ConfigError, match="report_budgets: unknown axis 'secs'; valid: seconds, teacher_queries"):
        load_grid(_write(tmp_path, GOOD + "report_budgets: {secs: [45]}\n"))
    with pytest.raises(ConfigError, match="report_budgets.seconds must be a non-empty list of positive numbers"):
        load_grid(_write(tmp_path, GOOD + "report_budgets: {seconds: [0]}\n"))


def test_latency_min_run_time_must_be_positive(tmp_path):
    assert load_grid(_write(tmp_path, GOOD + "latency_min_run_time: 0.2\n")).latency_min_run_time == 0.2
    assert load_grid("smoke").latency_min_run_time == 0.2 and load_grid("quick").latency_min_run_time is None
    with pytest.raises(ConfigError, match="latency_min_run_time must be > 0 seconds, got 0.0"):
        load_grid(_write(tmp_path, GOOD + "latency_min_run_time: 0\n"))


def test_dataset_options_of_a_dataset_outside_the_grid_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset_options: \['mnist'\] not in the grid's datasets; valid: digits"):
        load_grid(_write(tmp_path, GOOD + "dataset_options: {mnist: {image_size: 28}}\n"))
