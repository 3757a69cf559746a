"""`almost-ray export`: a stage's generated data as a Hugging Face dataset that TRL reads directly.

`--format parquet` (the default) writes `data/train-00000-of-00001.parquet` and the dataset card, a folder
`datasets.load_dataset(DIR)` loads and `push_to_hub` could publish as is; `--format disk` writes
`Dataset.save_to_disk` (for `datasets.load_from_disk`) with the card beside it. Comparisons keep TRL's
preference columns (`prompt`, `chosen`, `rejected`) for `RewardTrainer`/`DPOTrainer`; dialogues keep
`messages` for `SFTTrainer`. The metadata columns (rungs, scores, ids) travel with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from almost_ray.data.atomic import atomic_directory, check_replaceable
from almost_ray.data.cards import DATA_STAGES, card_text
from almost_ray.data.records import RecordError
from almost_ray.runs.manifest import read_manifest

ExportFormat = Literal["parquet", "disk"]
PARQUET_FILE = "data/train-00000-of-00001.parquet"


def check(stage_dir: str | Path, stage: str, to: str | Path) -> tuple[dict, Path]:
    """Before any work: a finished data stage to read, and a destination this command may write (a new
    folder, or one an earlier export wrote: `data/atomic.py`); returns its manifest and data file."""
    if stage not in DATA_STAGES:
        raise RecordError(f"export: stage {stage!r} writes no dataset; choose one of {', '.join(DATA_STAGES)}")
    check_replaceable(to)
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    data = stage_dir / DATA_STAGES[stage][0]
    if manifest is None or not data.is_file():
        raise RecordError(f"{stage_dir}: no finished {stage} stage here (run it first: its manifest.json is missing)")
    return manifest, data


def export(stage_dir: str | Path, stage: str, to: str | Path, fmt: ExportFormat = "parquet") -> Path:
    """Write the data of the finished stage in `stage_dir` into the folder `to`, whole or not at all."""
    import datasets

    manifest, data = check(stage_dir, stage, to)
    datasets.utils.logging.disable_progress_bar()
    dataset = datasets.Dataset.from_json(str(data), split="train")
    with atomic_directory(to) as tmp:
        if fmt == "parquet":
            (tmp / PARQUET_FILE).parent.mkdir(parents=True)
            dataset.to_parquet(str(tmp / PARQUET_FILE))
            files = PARQUET_FILE.replace("train-00000-of-00001", "train-*")
        else:
            dataset.save_to_disk(str(tmp))
            files = "data-*.arrow"
        (tmp / "README.md").write_text(card_text(stage, manifest, len(dataset), files), encoding="utf-8")
    return Path(to)
