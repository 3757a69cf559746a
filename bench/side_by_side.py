"""Ours and the peer (TRL) side by side in one run: the machine, its load, and each row's ratio to the peer's rows.

Both sides run in one process tree on the same 2 cores, so anything else running slows them unequally: a
1-minute load average above `BUSY_LOAD` when the run starts marks it not worth quoting. The load after it is
recorded too, but it is the benchmark's own (both cores busy), so it says nothing about other work.
"""

from __future__ import annotations

import os
import platform

import torch

BUSY_LOAD = 0.5  # a 1-minute load average above this on 2 cores: something else is running


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def warn_if_busy(loads: list[float]) -> None:
    """One warning line when the machine was busy as the run started (`loads[0]`; the rest are its own)."""
    if not is_idle(loads):
        print(f"WARNING: load average {loads} (> {BUSY_LOAD}): the machine is busy, these timings are not worth "
              "quoting; rerun on an idle machine", flush=True)


def is_idle(loads: list[float]) -> bool:
    return loads[0] <= BUSY_LOAD


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def add_ratios(results: list[dict], rate: str, group: str | None = None) -> None:
    """`ratio_vs_trl_defaults` and `ratio_vs_trl_fastest` of each row's `rate`, against the TRL rows (method
    "TRL ...", the defaults row naming "defaults") of the same `group` value (e.g. the task), in this run."""
    for r in results:
        peers = [x for x in results if group is None or x[group] == r[group]]
        trl = next((x for x in peers if "defaults" in x["method"]), None)
        fastest = max((x[rate] for x in peers if x["method"].startswith("TRL")), default=None)
        r["ratio_vs_trl_defaults"] = round(r[rate] / trl[rate], 2) if trl else None
        r["ratio_vs_trl_fastest"] = round(r[rate] / fastest, 2) if fastest else None
