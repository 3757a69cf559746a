"""Resumable output: rows are processed in fixed shards, each written atomically when complete.

A killed run leaves its finished shards on disk; the re-run skips them and only the unfinished
shards are processed again, so nothing is regenerated or duplicated. When every shard is present
they are merged, in input order, into the final file (atomically) and the shard folder is removed.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from almost_ray.data.atomic import atomic_open, own_directory, remove_own_directory, write_json
from almost_ray.data.sources import read_rows

SHARD_KEY = "_shard"
ROW_KEY = "_row"


class ShardedJsonl:
    """The shards of one JSONL output file, in `.<name>.shards/` beside it.

    Each input row must produce exactly one output row, carrying the `_shard` and `_row` keys it
    was given (`pending` adds them).
    """

    def __init__(self, final_path: str | Path, shard_size: int):
        self.final = Path(final_path)
        self.shard_size = shard_size
        self.dir = self.final.parent / f".{self.final.name}.shards"

    def _shard_path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:05d}.jsonl"

    def pending(self, rows: list[dict], key: str = "id") -> list[dict]:
        """Rows of the shards not yet written, tagged with their shard and position.

        Shards from an earlier run over different input rows (or another shard size) are discarded.
        """
        plan = hashlib.sha256(json.dumps([self.shard_size, [r[key] for r in rows]]).encode()).hexdigest()
        plan_file = self.dir / "plan.json"
        if self.dir.exists() and (not plan_file.exists() or json.loads(plan_file.read_text()) != plan):
            remove_own_directory(self.dir)
        if not self.dir.exists():
            own_directory(self.dir)
            write_json(plan_file, plan)
        self.expected = defaultdict(int)
        todo = []
        for i, row in enumerate(rows):
            shard = i // self.shard_size
            self.expected[shard] += 1
            if not self._shard_path(shard).exists():
                todo.append({**row, SHARD_KEY: shard, ROW_KEY: i})
        self.num_shards = len(self.expected)
        return todo

    def collect(self, results: Iterable[dict]) -> int:
        """Consume output rows as they stream in; write each shard the moment it is complete."""
        buffers: dict[int, list[dict]] = defaultdict(list)
        written = 0
        for row in results:
            shard = int(row[SHARD_KEY])
            buffers[shard].append(row)
            if len(buffers[shard]) == self.expected[shard]:
                rows = sorted(buffers.pop(shard), key=lambda r: int(r[ROW_KEY]))
                with atomic_open(self._shard_path(shard)) as f:
                    for r in rows:
                        clean = {k: v for k, v in r.items() if k not in (SHARD_KEY, ROW_KEY)}
                        f.write(json.dumps(clean, ensure_ascii=False) + "\n")
                written += 1
        if buffers:
            raise RuntimeError(f"{self.final}: shards {sorted(buffers)} received too few rows")
        return written

    def finalize(self) -> int:
        """Merge the shards into the final file; returns the number of rows."""
        missing = [s for s in range(self.num_shards) if not self._shard_path(s).exists()]
        if missing:
            raise RuntimeError(f"{self.final}: shards {missing} are missing")
        count = 0
        with atomic_open(self.final) as out:
            for s in range(self.num_shards):
                for row in read_rows(self._shard_path(s)):
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count += 1
        remove_own_directory(self.dir)
        return count
