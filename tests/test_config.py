"""Tests for rlhf_jax.config: nested YAML + overrides, strict keys/types, choices, round trip."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from rlhf_jax.config import (
    ConfigError,
    from_dict,
    load_config,
    parse_overrides,
    require,
    save_config,
    to_dict,
)
from rlhf_jax.run_config import OptimConfig, RunConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 4  # hidden size
    ratio: float = 0.5  # a float
    tags: tuple[str, ...] = ("a",)  # variable-length tuple
    pair: tuple[int, float] = (1, 2.0)  # fixed-length tuple

    def __post_init__(self):
        require(self.size > 0, "size", f"must be > 0, got {self.size}")


@dataclasses.dataclass(frozen=True)
class Toy:
    name: str = "toy"
    mode: Literal["fast", "slow", "on"] = "fast"
    limit: Optional[int] = None
    flag: bool = False
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)
    other: Inner = dataclasses.field(default_factory=lambda: Inner(size=8))
    maybe: Optional[Inner] = None
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


@dataclasses.dataclass(frozen=True)
class NeedsKey:
    path: str  # required


def _write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def test_defaults_without_sources():
    assert load_config(Toy) == Toy()


def test_nested_yaml_and_overrides(tmp_path):
    path = _write(
        tmp_path,
        "name: x\ninner:\n  size: 16\n  tags: [b, c]\noptim:\n  learning_rate: 3e-4\n  schedule: cosine\n",
    )
    cfg = load_config(Toy, path, overrides=("inner.ratio=2", "optim.learning_rate=1e-5", "limit=7", "flag=true"))
    assert cfg.name == "x"
    assert cfg.inner == Inner(size=16, ratio=2.0, tags=("b", "c"), pair=(1, 2.0))
    assert isinstance(cfg.inner.ratio, float)  # int accepted for float, stored as float
    assert cfg.optim.learning_rate == 1e-5 and cfg.optim.schedule == "cosine"
    assert cfg.limit == 7 and cfg.flag is True
    assert cfg.other.size == 8  # untouched non-trivial default kept


def test_partial_update_keeps_non_trivial_default():
    cfg = load_config(Toy, overrides=("other.ratio=0.25",))
    assert cfg.other == Inner(size=8, ratio=0.25)


def test_override_values_parse_as_yaml():
    cfg = load_config(
        Toy,
        overrides=("inner.tags=[x, y]", "inner.pair=[3, 4]", "limit=null", "weights.kl=0.1", "weights.len=2", "name=007"),
    )
    assert cfg.inner.tags == ("x", "y") and cfg.inner.pair == (3, 4.0)
    assert cfg.limit is None
    assert cfg.weights == {"kl": 0.1, "len": 2.0}
    assert cfg.name == "007"  # str field keeps the raw text


def test_yaml_on_off_are_strings_for_literals(tmp_path):
    assert load_config(Toy, _write(tmp_path, "mode: on\n")).mode == "on"
    assert load_config(Toy, overrides=("mode=on",)).mode == "on"
    assert load_config(Toy, overrides=("run.progress=off",)).run.progress == "off"


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lr'.*did you mean 'optim.learning_rate'") as e:
        load_config(Toy, overrides=("optim.lr=1e-4",))
    assert e.value.key == "optim.lr"
    with pytest.raises(ConfigError, match=r"unknown key 'inner.szie'.*did you mean 'inner.size'"):
        load_config(Toy, overrides=("inner.szie=3",))


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = _write(tmp_path, {"run": {"output_dri": "x"}})
    with pytest.raises(ConfigError, match=r"unknown key 'run.output_dri'.*'run.output_dir'.*c.yaml"):
        load_config(Toy, path)


@pytest.mark.parametrize(
    "override, key, expected, got",
    [
        ("inner.size=1.5", "inner.size", "int", "float 1.5"),
        ("inner.size=true", "inner.size", "int", "bool True"),
        ("inner.ratio=abc", "inner.ratio", "float", "str 'abc'"),
        ("flag=1", "flag", "bool", "int 1"),
        ("limit=x", "limit", "int", "str 'x'"),
        ("inner.tags=3", "inner.tags", "tuple", "int 3"),
        ("inner.pair=[1, 2, 3]", "inner.pair", "length 2", "list"),
        ("weights.kl=no", "weights.kl", "float", "str 'no'"),
        ("inner=3", "inner", "mapping for Inner", "int 3"),
    ],
)
def test_type_errors_name_key_expected_and_got(override, key, expected, got):
    with pytest.raises(ConfigError) as e:
        load_config(Toy, overrides=(override,))
    assert e.value.key == key
    msg = str(e.value)
    assert f"'{key}'" in msg and expected in msg and got in msg and override in msg


def test_tuple_element_error_names_index():
    with pytest.raises(ConfigError) as e:
        from_dict(Toy, {"inner": {"pair": [1, "z"]}})
    assert e.value.key == "inner.pair[1]"


def test_literal_choices_listed():
    with pytest.raises(ConfigError, match=r"'optim.schedule'.*invalid choice 'step'.*'constant', 'linear', 'cosine'"):
        load_config(Toy, overrides=("optim.schedule=step",))


def test_optional_nested_dataclass():
    assert load_config(Toy).maybe is None
    assert load_config(Toy, overrides=("maybe.size=2",)).maybe == Inner(size=2)


def test_post_init_validation_names_key_path():
    with pytest.raises(ConfigError, match=r"'other.size': must be > 0, got 0") as e:
        load_config(Toy, overrides=("other.size=0",))
    assert e.value.key == "other.size"
    with pytest.raises(ConfigError, match=r"'run.keep_last_n'"):
        load_config(Toy, overrides=("run.keep_last_n=0",))
    with pytest.raises(ConfigError, match=r"'optim.b2'"):
        load_config(Toy, overrides=("optim.b2=1.0",))


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"'path': missing required key"):
        load_config(NeedsKey)
    assert load_config(NeedsKey, overrides=("path=/x",)).path == "/x"


def test_bad_override_syntax_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["a..b=1"])
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(Toy, _write(tmp_path, "- 1\n- 2\n"))


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        Toy,
        overrides=("optim.learning_rate=1e-5", "inner.tags=[on, '1', yes]", "weights.kl=0.05", "maybe.size=3",
                   "name=on", "run.resume=never", "limit=3"),
    )
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(Toy, path)
    assert again == cfg
    assert to_dict(again)["inner"]["tags"] == ["on", "1", "yes"]
    assert isinstance(to_dict(cfg)["inner"]["pair"], list)


def test_run_and_optim_defaults_are_valid():
    run, optim = RunConfig(), OptimConfig()
    assert run.resume == "auto" and run.nan_policy == "stop" and run.progress == "auto"
    assert optim.max_grad_norm == 1.0 and optim.schedule == "constant"
