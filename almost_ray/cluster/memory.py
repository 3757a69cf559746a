"""Peak memory per stage, of the driver and of every actor the stage started, for its manifest.

One mechanism for every kind of actor (Ray Data pool replicas, `ReplicaSet` replicas, Ray Train workers,
PPO role actors): the actor measures ITS OWN peak — `getrusage(RUSAGE_SELF).ru_maxrss`, the high-water
mark of its process (a Ray actor has a worker process of its own for its whole life), plus
`torch.cuda.max_memory_allocated` when it used CUDA — and sends it with `report_peak(role)` to one named
`PeakLedger` actor of the driver's job. The ledger keeps each actor's latest report with the time it
arrived; `write_manifest` asks it for the actors that reported since the stage started. Ray Data owns its
pool actors' lifetimes, so pool replicas report after every batch (`replicas.MeasuredReplica`, one cheap call, and
only when the peak grew); the others report before they are killed or when their loop ends.

The driver's peak is its own high-water mark (`VmHWM`), which `reset_driver_peak` lowers to the current
RSS at the start of each pipeline stage (Linux's `/proc/self/clear_refs`, value 5), so a driver that runs
many stages gets each stage's own peak. Where that file cannot be written (not Linux), the driver's peak
is its whole process's and the manifest says so (`driver_window: "process"`).

Limits (docs/performance.md, "Peak memory"): memory of processes an actor starts itself (vLLM's engine
core) is not in its `ru_maxrss`; GPU memory is what torch allocated, not what the CUDA context or vLLM's
preallocation hold; the ledger's clock is the driver's node's (it is placed there), and a report counts
for a stage when it arrived after the stage started.

Measuring never fails the work it measures: when the ledger is gone (its node was lost, as in
tests/test_faults.py's lost-node test) a replica's report is dropped with one warning and the manifest
records the peaks that did arrive (`actors_peak_mib.ledger: "lost"`).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

LEDGER = "almost_ray_peak_ledger"
MIB = 2**20
REPORT_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_driver_window = "process"  # "stage" once reset_driver_peak has worked in this process


# --- measuring one process ------------------------------------------------------------------------------

def maxrss_mib() -> float:
    """This process's peak RSS in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def cuda_peak_mib() -> float | None:
    """torch's peak CUDA allocation in this process, or None when CUDA was never used here."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / MIB


def _proc_status_mib(key: str) -> float | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def driver_peak_mib() -> float:
    """The driver's peak RSS since `reset_driver_peak` (or since it started): `VmHWM` where /proc has it."""
    peak = _proc_status_mib("VmHWM")
    return maxrss_mib() if peak is None else peak


def current_rss_mib() -> float:
    """The driver's resident size now (`VmRSS`); its peak where /proc does not say."""
    rss = _proc_status_mib("VmRSS")
    return maxrss_mib() if rss is None else rss


def reset_driver_peak() -> None:
    """Start a new measuring window for the driver: its high-water mark drops to its current RSS."""
    global _driver_window
    try:
        _CLEAR_REFS.write_text("5")
        _driver_window = "stage"
    except OSError:
        pass


# --- collecting the actors' peaks -------------------------------------------------------------------------

class PeakLedger:
    """The named actor the stage's actors report to: the latest report of each actor and when it came."""

    def __init__(self):
        self.reports: dict[str, dict[str, Any]] = {}

    def report(self, actor: str, role: str, rss_mib: float, cuda_mib: float | None) -> None:
        self.reports[actor] = {"role": role, "rss_mib": rss_mib, "cuda_mib": cuda_mib, "at": time.time()}

    def since(self, started: float) -> list[dict[str, Any]]:
        return [r for r in self.reports.values() if r["at"] >= started]


def ensure_ledger() -> None:
    """Create the job's ledger when absent; called by the driver before it starts a stage's actors.

    It is not detached: the driver holds its handle (a named actor without handles is still garbage
    collected), so it lives as long as the driver's job, on the driver's node, and reserves no CPU.
    """
    global _held
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if _held is not None:
        try:
            ray.get_actor(LEDGER)
            return  # keep the handle that created it: replacing it would let the ledger be collected
        except ValueError:  # a new Ray session since
            pass
    node = ray.get_runtime_context().get_node_id()
    _held = ray.remote(PeakLedger).options(
        name=LEDGER, get_if_exists=True, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
    ).remote()


_held = None  # the driver's handle of the ledger
_ledger = None  # an actor's handle of the ledger
_reported: dict[str, tuple] = {}  # role -> last peaks sent from this process
_warned = False


def _ledger_lost(err: Exception) -> None:
    """A report that cannot reach the ledger is dropped (warned once per process), never raised."""
    global _ledger, _warned
    _ledger = None  # look it up again next time: a new Ray session may have made another
    if not _warned:
        log.warning("peak memory not recorded: the ledger actor is unreachable (%s)", type(err).__name__)
        _warned = True


def report_peak(role: str) -> None:
    """In an actor: send this process's peaks to the ledger (only when they grew since the last report).

    A no-op outside a Ray actor (the driver is measured as the driver) and when the driver made no ledger
    (a replica used directly, as in unit tests)."""
    global _ledger
    import ray

    if not ray.is_initialized():
        return
    actor = ray.get_runtime_context().get_actor_id()
    if actor is None:
        return
    rss, cuda = maxrss_mib(), cuda_peak_mib()
    peaks = (round(rss), None if cuda is None else round(cuda))
    if _reported.get(role) == peaks:
        return
    if _ledger is None:
        try:
            _ledger = ray.get_actor(LEDGER)
        except ValueError:
            return
    try:
        ray.get(_ledger.report.remote(actor, role, round(rss, 1), None if cuda is None else round(cuda, 1)),
                timeout=REPORT_TIMEOUT_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
        _ledger_lost(err)
        return
    _reported[role] = peaks


def gather(actors: dict[str, list], timeout_s: float = 10.0) -> None:
    """From the driver, before it kills actors it holds (role -> handles): each reports its peak."""
    import ray

    refs = [h.__ray_call__.remote(_report_in_actor, role) for role, handles in actors.items() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # a dead actor has no peak to give; its stage still finishes
            pass


def _report_in_actor(_instance, role: str) -> None:
    report_peak(role)


# --- the manifest's record ----------------------------------------------------------------------------------

def summarize(driver_mib: float, driver_window: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `memory`: the driver's peak, and the actors' peaks overall and per role (the most
    any one actor of the role used), in MiB; CUDA peaks only when an actor used CUDA."""
    by_role: dict[str, float] = {}
    cuda: dict[str, float] = {}
    for r in reports:
        by_role[r["role"]] = max(by_role.get(r["role"], 0.0), r["rss_mib"])
        if r.get("cuda_mib") is not None:
            cuda[r["role"]] = max(cuda.get(r["role"], 0.0), r["cuda_mib"])
    out: dict[str, Any] = {
        "driver_peak_mib": round(driver_mib, 1),
        "driver_window": driver_window,
        "actors_peak_mib": {"max": max(by_role.values()) if by_role else None, "actors": len(reports),
                            "by_role": dict(sorted(by_role.items()))},
    }
    if cuda:
        out["actors_cuda_peak_mib"] = {"max": max(cuda.values()), "by_role": dict(sorted(cuda.items()))}
    return out


def actor_reports(started: float) -> list[dict[str, Any]] | None:
    """The ledger's reports that arrived since `started` ([] when Ray is down or there is no ledger; None
    when the ledger exists by name but cannot answer, so its reports are lost)."""
    ray = sys.modules.get("ray")  # a driver that never imported Ray started no actor
    if ray is None or not ray.is_initialized():
        return []
    try:
        ledger = ray.get_actor(LEDGER)
    except ValueError:
        return []
    try:
        return ray.get(ledger.since.remote(started), timeout=REPORT_TIMEOUT_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
        _ledger_lost(err)
        return None


def stage_memory(started: float) -> dict[str, Any]:
    """What `write_manifest` records: this driver's peak in its current window and the stage's actors'."""
    reports = actor_reports(started)
    out = summarize(driver_peak_mib(), _driver_window, reports or [])
    if reports is None:
        out["actors_peak_mib"]["ledger"] = "lost"
    return out


def peak_cell(memory: dict[str, Any] | None) -> str:
    """`driver / actors` peak MiB for a report table ("—" for what was not measured)."""
    if not memory:
        return ""
    actors = (memory.get("actors_peak_mib") or {}).get("max")
    return f"{memory['driver_peak_mib']:.0f} / " + (f"{actors:.0f}" if actors is not None else "—")
