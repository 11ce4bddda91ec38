from dataclasses import dataclass, field
from typing import Literal

import pytest

from bench.config import ConfigError, from_mapping, replace, to_dict


@dataclass
class Inner:
    lr: float = 0.1


@dataclass
class Sample:
    name: str
    steps: int = 10
    lr: float = 1e-3
    kind: Literal["sgd", "adam"] = "adam"
    milestones: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    note: str | None = None


def test_valid_mapping_is_coerced():
    s = from_mapping(Sample, {"name": "a", "lr": 1, "milestones": [1, 2], "inner": {"lr": 2}})
    assert s.lr == 1.0 and isinstance(s.lr, float)
    assert s.inner.lr == 2.0
    assert to_dict(s)["milestones"] == [1, 2]


@pytest.mark.parametrize("data, needle", [
    ({"name": "a", "stepz": 3}, "unknown key(s) 'stepz'; valid keys: inner, kind, lr, milestones, name, note, steps"),
    ({"name": "a", "steps": "3"}, "where.steps: expected an integer, got '3'"),
    ({"name": "a", "steps": True}, "expected an integer"),
    ({"name": "a", "kind": "rmsprop"}, "'rmsprop' is not one of 'sgd', 'adam'"),
    ({"steps": 3}, "missing required key 'name'"),
    ({"name": "a", "milestones": [1, "x"]}, "where.milestones[1]: expected an integer"),
    ({"name": "a", "inner": {"lr": "fast"}}, "where.inner.lr: expected a number"),
])
def test_bad_values_name_the_key_and_choices(data, needle):
    with pytest.raises(ConfigError) as err:
        from_mapping(Sample, data, "where")
    assert needle in str(err.value)


def test_replace_validates():
    s = from_mapping(Sample, {"name": "a"})
    assert replace(s, {"steps": 5}, "x").steps == 5
    with pytest.raises(ConfigError, match="x.steps"):
        replace(s, {"steps": 0.5}, "x")


def test_whole_numbers_in_scientific_notation_are_integers():
    # YAML reads `1e7` as a string and `1.0e+7` as a float: a budget of 10^7 teacher queries takes both
    import yaml

    from bench.monitor import Budget

    for text in ("teacher_queries: 1e7", "teacher_queries: 1.0e+7", "teacher_queries: 10000000"):
        assert from_mapping(Budget, yaml.safe_load(text), "budget").teacher_queries == 10**7
    for bad in (1.5, "1e7x", True):
        with pytest.raises(ConfigError, match="budget.teacher_queries"):
            from_mapping(Budget, {"teacher_queries": bad}, "budget")
