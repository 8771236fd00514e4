"""Every scalar config field refuses a value outside its range and a value of the wrong type, naming itself.

Table-driven over ``fedlora.config.fields.FIELDS``: a field added there is tested here without a line
more. Each bad value is put into the default config (or the config that field belongs to) and the
whole validation runs, so the test also shows the problem is reported before anything starts.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import pytest
from conftest import compose

from fedlora.config.fields import FIELDS, Field, lookup
from fedlora.config.validate import validate
from fedlora.core.errors import ConfigError

# fields present only in another group's config
CONTEXT = {"model.base_seed": ["task=causal_lm"], "faults.fail_prob": [], "partition.alpha": [],
           **{f"privacy.{k}": ["privacy=dp_sgd"]
              for k in ("target_epsilon", "noise_multiplier", "clip", "delta", "accountant")}}


@functools.lru_cache(maxsize=8)
def _composed(overrides: tuple[str, ...]) -> dict:
    return compose(list(overrides))


def config_for(field: Field) -> dict:
    """A fresh copy of the config that holds ``field`` (composed once per context)."""
    return copy.deepcopy(_composed(tuple(CONTEXT.get(field.path, []))))


def bad_values(field: Field) -> list[Any]:
    """Values ``field`` must refuse: the wrong type, and just outside each bound."""
    wrong_type: list[Any] = {"int": [True, 2.5, "3"], "number": [True, "0.1", math.nan], "bool": [1, "yes"],
                             "str": [3]}[field.kind]
    out: list[Any] = list(wrong_type)
    if field.low is not None:
        out.append(field.low if field.low_open else field.low - (1 if field.kind == "int" else 0.5))
    if field.high is not None:
        out.append(field.high if field.high_open else field.high + (1 if field.kind == "int" else 0.5))
    if field.choices:
        out.append("nonsense")
    if not field.optional:
        out.append(None)
    return out


def with_value(cfg: dict, path: str, value: Any) -> dict:
    node = cfg
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return cfg


CASES = [pytest.param(field, value, id=f"{field.path}={value!r}") for field in FIELDS for value in bad_values(field)]


@pytest.mark.parametrize("field,value", CASES)
def test_a_bad_value_is_refused_naming_the_field(field: Field, value: Any) -> None:
    cfg = config_for(field)
    assert lookup(cfg, field.path) is not None or field.optional, f"{field.path} is missing from the config"
    with pytest.raises(ConfigError) as info:
        validate(with_value(cfg, field.path, value), check_model=False, check_data=False)
    assert f"{field.path}={value!r}: {field.fix}" in str(info.value)


@pytest.mark.parametrize("field", FIELDS, ids=[f.path for f in FIELDS])
def test_every_field_is_in_the_shipped_config(field: Field) -> None:
    # a field in the table that no config has would never be checked
    from fedlora.config.fields import _MISSING

    assert lookup(config_for(field), field.path) is not _MISSING


@pytest.mark.parametrize("overrides", [[], ["task=causal_lm"]])
def test_the_shipped_values_are_in_range(overrides: list[str]) -> None:
    from fedlora.config.fields import _MISSING

    cfg = compose(overrides)
    values = {f.path: lookup(cfg, f.path) for f in FIELDS if f.when is None or f.when(cfg)}
    assert [path for path, value in values.items() if value is not _MISSING and
            next(f for f in FIELDS if f.path == path).problem(value)] == []
