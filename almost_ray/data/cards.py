"""Dataset cards for the data a stage generates, in the form the Hugging Face Hub reads.

Each data stage (queries, comparisons, RMSP dialogues) writes a `README.md` beside its JSONL: a YAML
header (license, task, size, tags, the data files) and a body saying how the data was made — the models,
prompts and filters from the stage's manifest, and its counts. Synthetic data inherits the terms of the
models that wrote it, so the license is theirs when they agree and `other` (with each listed) when not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from almost_ray.data.atomic import atomic_open

# stage -> (data file, what one row is, tags)
DATA_STAGES: dict[str, tuple[str, str, list[str]]] = {
    "queries": ("queries.jsonl", "a user query mined with Self-Instruct (ALMoST Appendix C.1)", ["self-instruct"]),
    "compare": (
        "comparisons.jsonl",
        "a synthetic comparison: `prompt`, `chosen`, `rejected` (TRL's preference format), the chosen reply from "
        "the higher rung of a generator ladder (ALMoST Section 2.1)",
        ["preference", "reward-modeling"],
    ),
    "rmsp": (
        "dialogues.jsonl",
        "a dialogue in TRL's conversational format (`messages`), each assistant turn the reward model's best of "
        "N samples (RMSP, ALMoST Section 2.2)",
        ["sft", "conversational"],
    ),
}
DATA_STAGES["rmsp-plain"] = (DATA_STAGES["rmsp"][0], "a dialogue of plain self-play (no reward model)",
                             DATA_STAGES["rmsp"][2])
# Licenses of the models the project knows by name; a local model's comes from its own card.
KNOWN_LICENSES = {"embedded:smollm2-135m-instruct": "apache-2.0", "tiny:llama": "apache-2.0"}


def size_category(n: int) -> str:
    """The hub's `size_categories` bucket."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "n>10M"


def model_refs(config: Any) -> list[str]:
    """Every model reference in a stage config (any `ref` field, or `model`/`reward_model` string)."""
    found: list[str] = []

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in ("ref", "model", "reward_model", "policy") and node not in found:
            found.append(node)

    walk(config)
    return found


def model_license(ref: str) -> str | None:
    """A model's license: known by name, or the `license:` of its directory's README front matter."""
    if ref in KNOWN_LICENSES:
        return KNOWN_LICENSES[ref]
    readme = Path(ref).expanduser() / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            header = text.split("---", 2)[1]
            try:
                meta = yaml.safe_load(header) or {}
            except yaml.YAMLError:
                return None
            if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                return meta["license"]
    return None


def card_text(stage: str, manifest: dict[str, Any], rows: int, data_files: str) -> str:
    """The README.md of a stage's data: hub YAML header, then how it was made (from the manifest)."""
    _, row_meaning, tags = DATA_STAGES[stage]
    refs = model_refs(manifest.get("config", {}))
    licenses = {ref: model_license(ref) for ref in refs}
    known = {v for v in licenses.values() if v}
    license_id = known.pop() if len(known) == 1 and all(licenses.values()) else "other"
    header = {
        "license": license_id,
        "language": ["en"],
        "task_categories": ["text-generation"],
        "size_categories": [size_category(rows)],
        "tags": ["synthetic", "almost", *tags],
        "pretty_name": f"almost_ray {stage} ({manifest.get('config_hash', '')})",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
    }
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
        f"# almost_ray `{stage}` data", "",
        f"Synthetic data made by the almost_ray stage `{stage}`; {rows} rows, each {row_meaning}.",
        "No human wrote or labelled it.", "",
        "## Models", "",
    ]
    lines += [f"- `{ref}` — license: {licenses[ref] or 'unknown (check the model card)'}" for ref in refs] or ["- (none)"]
    lines += ["", "## How it was made", "", "The stage's configuration (its hash: "
              f"`{manifest.get('config_hash', '')}`), with prompts, sampling and filters:", "", "```yaml",
              yaml.safe_dump(manifest.get("config", {}), sort_keys=False).rstrip(), "```", "",
              "## Counts", "", "```yaml", yaml.safe_dump(manifest.get("counts", {}), sort_keys=False).rstrip(),
              "```", "", f"Versions: {manifest.get('versions', {})}; finished {manifest.get('finished_at', '')}.", ""]
    return "\n".join(lines)


def write_card(stage_dir: str | Path, stage: str, manifest: dict[str, Any]) -> Path | None:
    """Write `stage_dir/README.md` for a data stage whose data file exists; None for other stages."""
    if stage == "rmsp" and (manifest["config"].get("best_of") == 1 or manifest["config"].get("reward_model") is None):
        stage = "rmsp-plain"  # the plain self-play arm: no reward model chose any turn
    if stage not in DATA_STAGES:
        return None
    data = Path(stage_dir) / DATA_STAGES[stage][0]
    if not data.is_file():
        return None
    with data.open("rb") as f:
        rows = sum(1 for line in f if line.strip())
    path = Path(stage_dir) / "README.md"
    with atomic_open(path) as f:
        f.write(card_text(stage, manifest, rows, data.name))
    return path
