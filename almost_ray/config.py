"""The whole run's configuration: one section per stage, loaded from YAML with dotted overrides.

Each section is defined beside its stage (`synth/config.py`, `train/config.py`, `rmsp/config.py`,
`rl/config.py`, `eval/config.py`, `serve/config.py`, `generate/config.py`, `pipeline/config.py`) or in one
module per area (`models/config.py`: model, sampling and prompt formats; `adapters/config.py`: the
rules adapter; `cluster/config.py`: Ray and actor pools), all on `config_base.StrictModel`; this module
only puts them together. The config is validated once, at the edge (`load_config`), and passed down as
objects. Unknown keys and wrong types are errors that name the file, the line and the field, so nothing
runs with a half-valid config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from almost_ray.cluster.config import RayConfig
from almost_ray.config_base import ConfigError, StrictModel
from almost_ray.eval.config import EvalConfig, EvalRMConfig, RMScoreConfig
from almost_ray.generate.config import GenerateConfig
from almost_ray.pipeline.config import PipelineConfig, ReportConfig
from almost_ray.rl.config import PPOConfig, PPOGRPOConfig
from almost_ray.rmsp.config import RMSPConfig
from almost_ray.serve.config import ServeConfig
from almost_ray.synth.config import CompareConfig, QueriesConfig
from almost_ray.train.config import TrainDPOConfig, TrainRMConfig, TrainSFTConfig

__all__ = ["Config", "load_config"]


class Config(StrictModel):
    """The whole run. Each stage reads its own section; `runs_dir/run_name/<stage>/` holds outputs."""

    run_name: str = "demo"
    runs_dir: Path = Path("runs")
    ray: RayConfig = Field(default_factory=RayConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    train_rm: TrainRMConfig = Field(default_factory=TrainRMConfig)
    train_sft: TrainSFTConfig = Field(default_factory=TrainSFTConfig)
    train_dpo: TrainDPOConfig = Field(default_factory=TrainDPOConfig)
    eval_rm: EvalRMConfig = Field(default_factory=EvalRMConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rmsp: RMSPConfig = Field(default_factory=RMSPConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    ppo_grpo: PPOGRPOConfig = Field(default_factory=PPOGRPOConfig)
    rm_score: RMScoreConfig = Field(default_factory=RMScoreConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_name


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults when `path` is None), apply `dotted.key=value` overrides, validate."""
    overrides = overrides or []
    text = ""
    source = "<defaults>"
    if path is not None:
        source = str(path)
        text = _read_config_text(Path(path))
    try:
        data = yaml.safe_load(text) if path is not None else {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        if path is not None:  # a file that sets nothing would run every stage on defaults, unnoticed
            raise ConfigError(f"{source}: empty config (no sections); omit --config to run on the defaults")
        data = {}
    duplicate = _first_duplicate_key(yaml.compose(text)) if text else None
    if duplicate:
        raise ConfigError(f"{source}:{duplicate}")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the top level must be a mapping of sections, got {type(data).__name__}")
    overridden: dict[tuple[str, ...], str] = {}
    for item in overrides:
        keys = _apply_override(data, item)
        overridden[keys] = item
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source, text, overridden)) from None


def _read_config_text(path: Path) -> str:
    """The config file's text, or a one-line error naming it: missing, a folder, unreadable, not UTF-8."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte {err.start})") from None
    return text


def _first_duplicate_key(node: Any, path: tuple[str, ...] = ()) -> str | None:
    """`line: dotted.key: duplicate key (...)` for the first key given twice in one mapping. YAML forbids
    it, but PyYAML silently keeps the last value, so a second `temperature:` would win unnoticed."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in seen and name != "<<":
                return f"{line}: {'.'.join(path + (name,))}: duplicate key (first at line {seen[name]})"
            seen.setdefault(name, line)
            found = _first_duplicate_key(value, path + (name,))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _first_duplicate_key(item, path + (str(index),))
            if found:
                return found
    return None


def _apply_override(data: dict[str, Any], item: str) -> tuple[str, ...]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    dotted, raw = item.split("=", 1)
    keys = tuple(k for k in dotted.strip().split("."))
    if not all(keys):
        raise ConfigError(f"--set {item!r}: empty key in {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value
    return keys


def _describe(err: ValidationError, source: str, text: str, overridden: dict[tuple[str, ...], str]) -> str:
    root = yaml.compose(text) if text else None
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        field = ".".join(loc) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {e.get('input')!r})"
        origin = next((f"--set {v}" for k, v in overridden.items() if loc[: len(k)] == k), None)
        where = origin or (f"{source}:{_line_of(root, e['loc'])}" if root is not None else source)
        lines.append(f"{where}: {field}: {msg}{got}")
    return "\n".join(lines)


def _line_of(node: Any, loc: tuple[Any, ...]) -> int:
    """1-based line of the deepest YAML node along `loc` (the key itself for unknown keys)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
