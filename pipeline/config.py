"""Typed configs from YAML, with `key=value` overrides.

Every stage defines one dataclass (fields documented where they are defined); a YAML file only overrides
defaults. A field whose type is itself a dataclass may be given inline as a mapping or as the path of
another YAML file (relative to the file that names it), so a recipe's model spec and world settings are
written once and shared by every stage. Such a file is read into a mapping, in a config file or an override, so
that a dotted override (`world.seed=3`) can reach inside it.

Unknown keys and wrong types are errors that name the file (or the command-line override) and the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# integer keys that a loop divides by or steps with (eval_every, log_every, checkpoint_every, every *batch_size,
# grad_accum, epochs, ppo_epochs): 0 would fail mid-run with a bare ZeroDivisionError, or train on nothing.
# max_new_tokens: a sampler asked for no tokens makes empty replies, and prompt-length checks assume room for one.
COUNTS_FROM_ONE = ("every", "batch_size", "grad_accum", "epochs", "max_new_tokens")
# learning rates (learning_rate, policy_lr, critic_lr): 0 or below trains nothing or climbs the loss.
# grad_clip: clipping to a norm of 0 zeroes every gradient, and below 0 turns it around.
POSITIVE = ("learning_rate", "_lr", "grad_clip")
# below 0 these train wrongly without an error (weight decay that grows the weights, a loss term that rewards what
# it should penalise) or act as 0 (a count of prompts, a token limit, a chunk size, warmup steps)
NOT_NEGATIVE = ("weight_decay", "_coef", "margin", "eval_prompts", "max_prompts", "max_prompt_tokens",
                "rm_max_length", "forward_chunk", "warmup_steps", "keep_checkpoints", "peak_flops")
# fractions: of the peak learning rate (min_lr_ratio, in [0, 1]); of the steps (warmup_ratio) and of the units
# dropped (dropout), in [0, 1)
FRACTIONS_TO_ONE = {"min_lr_ratio": True, "warmup_ratio": False, "dropout": False}  # key: 1 itself allowed


class ConfigError(ValueError):
    """A config file or override does not fit its dataclass."""


def _naming(keys: tuple[str, ...]) -> str:
    return f"key '{keys[0]}'" if len(keys) == 1 else "keys " + ", ".join(f"'{k}'" for k in keys)


class FieldError(ConfigError):
    """A dataclass's own check of one of its fields, or of several together (`key` a tuple); loading names them
    with their full dotted keys, and the override that set them."""

    def __init__(self, key: str | tuple[str, ...], problem: str):
        self.keys = (key,) if isinstance(key, str) else tuple(key)
        super().__init__(f"{_naming(self.keys)}: {problem}")
        self.problem = problem


class _CheckFailed(ConfigError):
    """A dataclass's own check (`__post_init__`) refused the values; `keys` are the full dotted keys it names.
    Such a check may span keys, so with overrides it is judged on the final combination."""

    def __init__(self, where: str, keys: tuple[str, ...], problem: str):
        super().__init__(f"{where}: {_naming(keys)}: {problem}" if keys else f"{where}: {problem}")
        self.keys, self.problem = keys, problem


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, base_dir: Path, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (nested dataclasses, int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, base_dir, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: key '{key}': expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):  # a path to another YAML file
            path = _section_file(value, base_dir, where, key, tp)
            try:
                return load_config(tp, path)
            except _CheckFailed as e:  # that file's own values are wrong; no override can reach inside it
                raise ConfigError(str(e)) from None
        if isinstance(value, dict):
            return _build(tp, value, where, base_dir, f"{key}.")
        raise ConfigError(f"{where}: key '{key}': expected a mapping or a YAML path for {tp.__name__}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}': expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, where, base_dir, f"{key}[{i}]") for i, v in enumerate(value)]
        if key.endswith("adam_betas") and (len(items) != 2 or not all(0 <= b < 1 for b in items)):
            raise ConfigError(f"{where}: key '{key}': expected two numbers in [0, 1), e.g. [0.9, 0.95]; got {items}")
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}': expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, where, base_dir, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):  # YAML reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: key '{key}': expected a finite number, got {value}")
        if value <= 0 and key.endswith(POSITIVE):
            raise ConfigError(f"{where}: key '{key}': must be above 0, got {value}")
        to_one = FRACTIONS_TO_ONE.get(key.rsplit(".", 1)[-1])
        if to_one is not None and not (0 <= value <= 1 if to_one else 0 <= value < 1):
            raise ConfigError(f"{where}: key '{key}': must be a fraction in [0, 1{']' if to_one else ')'}, got "
                              f"{value}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 and key.endswith(NOT_NEGATIVE):
        raise ConfigError(f"{where}: key '{key}': must be 0 or more, got {value}")
    if tp is float and isinstance(value, float):
        return value
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: key '{key}': expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: key '{key}': expected an integer, got {value!r}")
    if tp is int and value < 1 and key.endswith(COUNTS_FROM_ONE):
        raise ConfigError(f"{where}: key '{key}': must be 1 or more, got {value}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    return value


def _stage_defaults(field: dataclasses.Field) -> dict:
    """What a section field's own default sets apart from its class's defaults (PPO's `prompts` path, its sampling
    temperature 0.7): a section given in part (`prompts.max_rows=20`, `sampling: {top_p: 0.9}`) keeps them."""
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return {}
    try:
        plain = type(default)()
    except TypeError:  # a section with required fields: all of its default counts
        plain = None
    kept = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)
            if f.init and (plain is None or getattr(default, f.name) != getattr(plain, f.name))}
    return {name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            for name, value in kept.items()}


def _build(cls: type[T], values: dict, where: str, base_dir: Path, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    kwargs, section_failed = {}, None
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(cls, key, names, where, prefix)
        if isinstance(value, dict):
            value = {**_stage_defaults(fields[key]), **value}
        try:
            kwargs[key] = _coerce(value, hints[key], where, base_dir, f"{prefix}{key}")
        except _CheckFailed as e:  # a section's own check: first finish checking the other keys' names and types
            section_failed = section_failed or e
    if section_failed is not None:
        raise section_failed
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise _CheckFailed(where, tuple(f"{prefix}{key}" for key in e.keys), e.problem) from None
    except _CheckFailed:
        raise
    except ConfigError as e:  # a check that names no field
        raise _CheckFailed(where, (), str(e)) from None
    except ValueError as e:  # a dataclass's own check of its values (WorldConfig's ranges, ...)
        section = prefix.rstrip(".")
        raise _CheckFailed(where, (section,) if section else (), str(e)) from None


def _unknown_key(cls: type, key: Any, names: list[str], where: str, prefix: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{prefix}{key}' for {cls.__name__}{hint}")


def _set_path(tree: dict, dotted: str, value: Any, item: str) -> None:
    """Set the dotted key of the override `item` in `tree`."""
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a section")
    node[leaf] = value


def _as_tree(cls: type, raw: dict, base_dir: Path, where: str, prefix: str = "") -> dict:
    """Expand fields given as YAML paths into mappings, so a dotted override can reach inside them."""
    hints = typing.get_type_hints(cls)
    out = dict(raw)
    for key, value in raw.items():
        section = _section_type(hints.get(key))
        if section is not None and isinstance(value, str):
            out[key] = _section_tree(section, value, base_dir, where, f"{prefix}{key}")
    return out


def _section_tree(tp: type, value: str, base_dir: Path, where: str, key: str) -> dict:
    """The section `key` (of dataclass `tp`) given as the path of a YAML file, read into a mapping (its own
    sections too)."""
    path = _section_file(value, base_dir, where, key, tp)
    section = _read_yaml(path)
    names = [f.name for f in dataclasses.fields(tp) if f.init]
    for inner in section:  # a typo in world.yaml is named there, not in the stage file that points to it
        if inner not in names:
            raise _unknown_key(tp, inner, names, str(path), f"{key}.")
    return _as_tree(tp, section, path.parent, str(path), f"{key}.")


def _section_type(tp: Any) -> Any:
    """The dataclass of a section's annotation (`DatasetSpec`, or `DatasetSpec | None`); None if not a section."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return next((a for a in options if dataclasses.is_dataclass(a)), None)


def _section_file(value: str, base_dir: Path, where: str, key: str, tp: type) -> Path:
    """A section (a dataclass field) given as the path of a YAML file: relative to the file that names it, else to
    the working directory. Anything else (`data=/path/t.jsonl`, meant for data.path) is named with its key."""
    path = Path(value) if Path(value).is_absolute() else base_dir / value
    if not path.exists() and Path(value).exists():
        path = Path(value)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        inner = "path" if "path" in {f.name for f in dataclasses.fields(tp)} else None
        raise ConfigError(f"{where}: key '{key}': expected a mapping or a YAML file for {tp.__name__}, got "
                          f"{value!r} ({'not found' if path.suffix in ('.yaml', '.yml') else 'not a .yaml file'})"
                          + (f"; to name a dataset, set {key}.{inner}={value}" if inner else ""))
    return path


def _read_yaml(path: Path) -> dict:
    try:
        loader = yaml.SafeLoader(Path(path).read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            _refuse_duplicate_keys(node, path)
            raw = (loader.construct_document(node) if node is not None else None) or {}
        finally:
            loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return raw


def _refuse_duplicate_keys(node: yaml.Node | None, path: Path, prefix: str = "", seen: set | None = None) -> None:
    """A key given twice in one mapping of a YAML file (YAML keeps the last without a word: `max_steps: 3`, and
    further down `max_steps: 50`) is refused, with its dotted name and both lines."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node checked already (or of one that holds it)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            # several `<<` merge keys in one mapping are YAML's way to merge several anchors, not a duplicate
            merge = isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:merge"
            name = f"{prefix}{key.value}" if isinstance(key, yaml.ScalarNode) and not merge else None
            if name in lines:
                where = sorted({lines[name], key.start_mark.line + 1})
                raise ConfigError(f"{path}: key '{name}' is given twice (line{'s' if len(where) > 1 else ''} "
                                  f"{' and '.join(map(str, where))}); keep one")
            if name is not None:
                lines[name] = key.start_mark.line + 1
            _refuse_duplicate_keys(value, path, f"{name or prefix}.", seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{prefix.rstrip('.')}[{i}].", seen)


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of a dotted key inside `cls` (through nested dataclasses), or None if it names no field."""
    tp: Any = cls
    for part in dotted.split("."):
        nested = _section_type(tp)
        if nested is None:
            return None
        tp = typing.get_type_hints(nested).get(part)
    return tp


def is_config_key(cls: type, dotted: str) -> bool:
    """Whether a dotted key names a field of the config dataclass `cls` (or of a dataclass nested in it)."""
    return _field_type(cls, dotted) is not None


def _takes_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _takes_text_items(tp: Any) -> bool:
    """A list or tuple of text (sample_prompts, target_modules, the world's word lists)."""
    return typing.get_origin(tp) in (list, tuple) and typing.get_args(tp)[:1] == (str,)


# what YAML reads as null (besides an empty value, which an override keeps as "")
YAML_NULLS = ("null", "Null", "NULL", "~")


def _override_value(item: str, key: str, text: str, tp: Any) -> Any:
    """The value of the override `item` (`key=text`) for a field annotated `tp` (None: no such field, which the
    build names). A text key keeps the text as typed; any other is read as YAML."""
    if _takes_text(tp):
        return _as_text(text)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    # YAML reads `[Question: What is]` as a list holding a mapping, and cuts `[a #b]` at the comment
    if _takes_text_items(tp) and (not isinstance(value, list) or any(isinstance(v, dict) for v in value)):
        raise ConfigError(f"override '{item}': key '{key}': expected a list of text like [a, b], got {value!r}; "
                          f"an item holding ': ' or ' #' needs quotes, e.g. [\"Question: What is\"]")
    return value


def _as_text(text: str) -> Any:
    """A text key's override as typed: read as YAML, `init_from=/data/run #2/final` lost all after the `#` (a
    comment), `wandb_project=my: proj` became a mapping and `run_name=2024-06-01` a date. A quoted value is
    unquoted as YAML would (`run_name="a b"`); `null` or `~` is None, as before (an optional key's unset)."""
    if text in YAML_NULLS:
        return None
    if text[:1] in ("'", '"'):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:  # `"a" b`: not one quoted scalar, so the quotes are part of the text
            return text
        if isinstance(value, str):
            return value
    return text


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from its defaults, the YAML at `path`, then `key=value` overrides (dotted for nesting)."""
    path = Path(path) if path else None
    raw = _read_yaml(path) if path else {}
    base_dir = path.parent if path else Path.cwd()
    where = str(path) if path else "config"
    tree = _as_tree(cls, raw, base_dir, where)
    overrides = overrides or []
    # Each step is built at once, so that an unknown key or a wrong type names the file or the override that
    # brought it. A check across keys waits for the final combination: `rollout_batch_size=8 minibatch_size=4`
    # passes through a state where 8 is no multiple of the file's minibatch of 16.
    file_passes = _build_step(cls, tree, where, base_dir, checks=not overrides)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value")
        tp = _field_type(cls, key)
        value = _override_value(item, key, text, tp)
        trial = copy.deepcopy(tree)
        _set_path(trial, key, value, item)
        _build_step(cls, trial, f"override '{item}'", base_dir, checks=False)  # names the file if it fails alone
        section = _section_type(tp)
        if section is not None and isinstance(value, str):
            # a section given as a YAML path is read into a mapping, as in a config file, so that a later dotted
            # override (`world=... world.seed=3`) refines it: a path is no section to set a key in
            _set_path(trial, key, _section_tree(section, value, base_dir, f"override '{item}'", key), item)
        tree = trial
    try:
        return _build(cls, tree, where, base_dir)
    except _CheckFailed as e:
        if not overrides:
            raise
        # name the override(s) that set the refused keys or their section, else the file if it fails alone
        last = {item.partition("=")[0]: item for item in overrides}  # a key given twice: its last value counts
        setting = [f"'{item}'" for key, item in last.items() if any(_same_branch(key, k) for k in e.keys)]
        source = (f"override {setting[0]}" if len(setting) == 1 else f"overrides {', '.join(setting)}" if setting
                  else f"{where} with its overrides" if file_passes else where)
        raise ConfigError(f"{source}: {_naming(e.keys)}: {e.problem}" if e.keys else f"{source}: {e.problem}") \
            from None


def _build_step(cls: type, tree: dict, where: str, base_dir: Path, checks: bool) -> bool:
    """Build to find key and type errors; False if only a dataclass's own check failed (raised with `checks`)."""
    try:
        _build(cls, tree, where, base_dir)
    except _CheckFailed:
        if checks:
            raise
        return False
    return True


def _same_branch(key: str, other: str) -> bool:
    """One dotted key is the other or lies inside it ('sampling' and 'sampling.temperature')."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
