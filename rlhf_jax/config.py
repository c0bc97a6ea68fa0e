"""Typed, frozen, nested run configs: YAML + dotted `key=value` overrides, strict checking, YAML dump.

Every trainer declares its config as a tree of `@dataclasses.dataclass(frozen=True)` classes with a
comment per field; this module holds only the generic machinery; the two configs every trainer shares (`OptimConfig`,
`RunConfig`) are in `rlhf_jax.run_config`. Nothing here knows any algorithm.

    cfg = load_config(PPOConfig, "configs/ppo_tiny.yaml", overrides=("optim.learning_rate=1e-5",))
    save_config(cfg, f"{cfg.run.output_dir}/config.yaml")   # load_config of that file gives cfg back

Rules (nanoGPT/Levanter style): unknown keys are errors (with a close-match suggestion), values are
type-checked against the annotations (`int` is accepted where `float` is expected, never the other way),
`Literal[...]` fields list their choices, and each dataclass validates its own invariants in
`__post_init__` (via `require`); every error names the full dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
import types
import typing
from typing import Any, Literal, Mapping, Sequence, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "from_dict",
    "load_config",
    "parse_overrides",
    "require",
    "save_config",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; `key` is the full dotted key (empty for the root)."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config key '{key}': {message}" if key else f"config: {message}")


def require(condition: bool, key: str, message: str) -> None:
    """Raise `ConfigError(key, message)` unless `condition`; for use in `__post_init__` validation."""
    if not condition:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------------------------------
# YAML scalars: PyYAML (YAML 1.1) reads `1e-5` as a string; accept it as a float like YAML 1.2 does.
class _Loader(yaml.SafeLoader):
    pass


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _ch in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_ch] = [
        r for r in _Loader.yaml_implicit_resolvers.get(_ch, []) if r[0] != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
# Booleans only as true/false (YAML 1.2): `progress: on` must stay the string "on".
for _ch in "yYnNoOtTfF":
    _Loader.yaml_implicit_resolvers[_ch] = [
        r for r in _Loader.yaml_implicit_resolvers.get(_ch, []) if r[0] != "tag:yaml.org,2002:bool"
    ]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class _Override:
    """A value from the command line: keeps the raw text so `name=007` stays a string for `str` fields."""

    text: str
    value: Any
    source: str


# --------------------------------------------------------------------------------------------------
def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parse `("a.b=1", "c=[1, 2]")` into a nested dict; values are YAML scalars/lists.

    Raises:
      ConfigError: an item without `=` or with an empty key.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("", f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(key, f"override '{item}' has an empty key")
        try:
            value = _yaml_value(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(key, f"override '{item}' is not valid YAML: {e}") from None
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"override '{item}' conflicts with a scalar override")
            node = child
        node[parts[-1]] = _Override(text=text.strip(), value=value, source=item)
    return tree


def _merge(base: Any, update: Any) -> Any:
    """Deep-merge `update` into `base` (dicts merge, anything else replaces)."""
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for k, v in update.items():
            out[k] = _merge(out[k], v) if k in out else v
        return out
    return update


def load_config(cls: type[T], yaml_path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build config dataclass `cls` from an optional YAML file and dotted `key=value` overrides.

    Later sources win: dataclass defaults < YAML file < overrides.

    Raises:
      ConfigError: unknown key (with suggestion), wrong type, bad choice, missing required key, or a
        failed `__post_init__` check; the message names the file and the full dotted key.
    """
    data: dict[str, Any] = {}
    where = ""
    if yaml_path is not None:
        where = str(yaml_path)
        with open(yaml_path, encoding="utf-8") as f:
            try:
                loaded = yaml.load(f, Loader=_Loader)
            except yaml.YAMLError as e:
                raise ConfigError("", f"{where} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("", f"{where} must hold a mapping at top level, got {type(loaded).__name__}")
        data = loaded
    data = _merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if where:
            raise ConfigError(e.key, f"{e.message} (in {where} or overrides)") from None
        raise


def from_dict(cls: type[T], data: Mapping[str, Any], *, _path: str = "") -> T:
    """Build dataclass `cls` from a nested mapping, checking keys and types (see module docstring)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(_path, f"expected a mapping for {cls.__name__}, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_join(_path, str(key)), _unknown_message(cls, _path, str(key)))
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = _join(_path, name)
        if name in data:
            value = data[name]
            default = _default_of(field)
            if isinstance(value, Mapping) and dataclasses.is_dataclass(default):
                value = _merge(to_dict(default), dict(value))  # partial update of a non-trivial default
            kwargs[name] = _coerce(value, hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(key, f"missing required key (type {_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_join(_path, e.key), e.message) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(_path, f"invalid {cls.__name__}: {e}") from None


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class tree (used for suggestions)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        keys.append(key)
        sub = _dataclass_in(typing.get_type_hints(cls)[f.name])
        if sub is not None:
            keys.extend(_all_keys(sub, key))
    return keys


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def _unknown_message(cls: type, path: str, key: str) -> str:
    siblings = [f.name for f in dataclasses.fields(cls)]
    close = [_join(path, c) for c in _suggest(key, siblings)]
    if not close:  # a key put at the wrong level: compare with every dotted key below this level
        close = [_join(path, c) for c in difflib.get_close_matches(key, _all_keys(cls), n=1, cutoff=0.6)]
    hint = f" — did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{_join(path, key)}'{hint} (valid keys of {cls.__name__}: {', '.join(siblings)})"


def _suggest(key: str, names: Sequence[str]) -> list[str]:
    """Closest names: by word initials (`lr` → `learning_rate`), then difflib, then as a subsequence."""
    k = key.lower()
    initials = [n for n in names if "".join(w[:1] for w in n.split("_")) == k]
    if initials:
        return initials[:1]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return close

    def is_subsequence(small: str, big: str) -> bool:
        it = iter(big)
        return all(c in it for c in small)

    subseq = [n for n in names if n[:1].lower() == k[:1] and is_subsequence(k, n.lower())]
    return sorted(subseq, key=len)[:1]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; returns the value in canonical form (tuple, float, ...)."""
    raw = value
    if isinstance(value, _Override):
        if tp is str or (_is_union(tp) and str in typing.get_args(tp) and value.value is not None):
            return value.text if not isinstance(value.value, str) else value.value
        if typing.get_origin(tp) is Literal and value.text in typing.get_args(tp):
            return value.text
        value = value.value
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        src = f" (from override '{raw.source}')" if isinstance(raw, _Override) else ""
        return ConfigError(key, f"expected {expected}, got {_describe(value)}{src}")

    if tp is Any:
        return value
    if _is_union(tp):
        if value is None:
            if type(None) in args:
                return None
            raise bad(_type_name(tp))
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(raw, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise bad(_type_name(tp))
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        src = f" (from override '{raw.source}')" if isinstance(raw, _Override) else ""
        raise ConfigError(key, f"invalid choice {value!r}{src}; choose one of {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad(f"a mapping for {tp.__name__}")
        return from_dict(tp, value, _path=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("bool")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("str")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad(_type_name(tp))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"{_type_name(tp)} of length {len(args)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise bad(_type_name(tp))
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            ck = _coerce(k, kt, f"{key}.<key>")
            out[ck] = _coerce(v, vt, _join(key, str(k)))
        return out
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")


# --------------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> Any:
    """Config dataclass (tree) → plain nested dicts/lists/scalars, ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def save_config(cfg: Any, path: str | pathlib.Path) -> pathlib.Path:
    """Write `cfg` as YAML (keys in declaration order); `load_config(type(cfg), path)` gives `cfg` back."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None), encoding="utf-8")
    return path
