"""What PPO does when a role actor dies: Ray Train's `FailureConfig(max_failures)` contract, for our roles.

Role actors start with `max_restarts=0` (rl/roles.py) on purpose: Ray restarting one actor alone would
bring it back with its *initial* weights, out of step with the other roles, and a data-parallel role's
process group would stay broken. So, as Ray Train restarts its whole worker group, `trainer.train`
tears every role and the placement group down, starts them again and restores the latest checkpoint;
the iterations since it are recomputed, seeded per episode and per iteration, so they come out as
they did (and `metrics.jsonl` is cut back to the checkpoint, as on any resume). Each restart is one
line of `restarts.jsonl` in the stage directory, counted in the manifest; after `ppo.max_failures` of
them the run fails, and running the command again resumes from the same checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

RESTARTS = "restarts.jsonl"
PING_TIMEOUT_S = 30.0


@dataclass
class Attempt:
    """Where one attempt of `train` got to: the 1-based iteration running (None outside the loop: the
    roles starting, the final save) and, once it failed with a Ray error, the replicas that no longer answer."""

    iteration: int | None = None
    phase: str = "while starting the roles"
    dead: list[str] = field(default_factory=list)


class RoleActorDied(RuntimeError):
    """A role actor died and `ppo.max_failures` restarts are used up."""


def dead_replicas(actors: dict[str, list]) -> list[str]:
    """`<role> replica <i>` of each actor that answers a ping with RayActorError (ActorDiedError and
    ActorUnavailableError are its subclasses in Ray 2.60); a slow answer is not taken for death."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    pings = {f"{role} replica {i}": actor.node_id.remote()
             for role, handles in actors.items() for i, actor in enumerate(handles)}
    dead = []
    for name, ref in pings.items():
        try:
            ray.get(ref, timeout=PING_TIMEOUT_S)
        except RayActorError:
            dead.append(name)
        except GetTimeoutError:
            pass
    return dead


def is_role_death(err: BaseException, attempt: Attempt) -> bool:
    """A Ray error that a dead role actor explains: the actor's own error, or any Ray error (a task
    failing because its peer died) raised while a replica is found dead."""
    from ray.exceptions import RayActorError, RayError

    return isinstance(err, RayActorError) or (isinstance(err, RayError) and bool(attempt.dead))


def describe(err: BaseException, attempt: Attempt) -> str:
    where = f"in iteration {attempt.iteration}" if attempt.iteration else attempt.phase
    who = ", ".join(attempt.dead) or "a role actor"
    return f"{where} ({who}: {type(err).__name__})"


def restart_line(err: BaseException, attempt: Attempt, checkpoint: int, failures: int, max_failures: int) -> str:
    limit = "no limit" if max_failures < 0 else str(max_failures)
    resume = f"the checkpoint after iteration {checkpoint}" if checkpoint else "the start (no checkpoint yet)"
    return f"[ppo] role actor died {describe(err, attempt)}; restarting from {resume} (failure {failures}/{limit})"


def record_restart(stage_dir: Path, err: BaseException, attempt: Attempt, checkpoint: int, failures: int) -> None:
    """Append the restart to `restarts.jsonl` (the run's history: a re-run after a driver kill adds to it)."""
    line = {"failure": failures, "iteration": attempt.iteration, "checkpoint": checkpoint, "dead": attempt.dead,
            "error": type(err).__name__, "message": str(err).splitlines()[0][:500] if str(err) else "",
            "time": round(time.time(), 3)}
    with (stage_dir / RESTARTS).open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def restarts(stage_dir: Path) -> int:
    path = stage_dir / RESTARTS
    return sum(1 for ln in path.read_text().splitlines() if ln.strip()) if path.is_file() else 0
