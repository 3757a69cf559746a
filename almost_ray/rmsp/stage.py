"""`almost-ray rmsp`: reward-model-guided self-play over Ray Data, the SFT demonstrations (ALMoST 2.2).

One pool of long-lived replicas per role (`replicas.ReplicaSet`), each loading its model once and
serving every turn; the turns are chained so each dialogue moves on as soon as its previous turn is
done (when the roles do not all fit the cluster at once, they take turns instead: `selfplay`):

    queries ─▶ [assistant replicas: N samples] ─▶ [RM replicas: score N in context] ─▶ best-of-N
            ─▶ [user replicas: follow-up] ─▶ ... until T assistant turns ─▶ dialogues.jsonl

Without an RM (`reward_model: null`) or with `best_of: 1` it is plain self-play. Outputs land in
`runs/<run>/rmsp/`: `dialogues.jsonl` (TRL `messages`, each assistant turn's candidates, scores and
chosen index), `dropped.jsonl` (queries whose first answer was degenerate), `metrics.jsonl` (progress)
and `manifest.json`. Finished shards survive a kill and the re-run does only the rest.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from functools import partial
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.dashboard import add_counts, progress, run_of
from almost_ray.cluster.preflight import fits_together, pool_bundles, preflight
from almost_ray.cluster.replicas import ModelReplica, ReplicaSet, generator_model, reward_model
from almost_ray.config import Config
from almost_ray.config_base import ConfigError, config_hash
from almost_ray.data.atomic import atomic_open, remove_own_directory
from almost_ray.data.shards import ROW_KEY, SHARD_KEY, ShardedJsonl
from almost_ray.data.sources import load_queries, read_rows, require
from almost_ray.models.loading import check_model_ref
from almost_ray.prompts.templates import fewshot_header, load_prompt_text
from almost_ray.rmsp import turns
from almost_ray.rmsp.config import RMSPConfig
from almost_ray.runs import paths
from almost_ray.runs.manifest import input_hash
from almost_ray.runs.stage import Outcome, Stage


def mode(cfg: RMSPConfig) -> str:
    """`rmsp` when an RM chooses among several samples, else `self-play` (ALMoST Table 5's two arms)."""
    return "rmsp" if cfg.reward_model is not None and cfg.best_of > 1 else "self-play"


def samples_per_turn(cfg: RMSPConfig) -> int:
    """N: the assistant's samples per turn; one without an RM, since nothing could choose among them."""
    return cfg.best_of if cfg.reward_model is not None else 1


def prompt_file(source: str) -> Path:
    """The file behind a prompt name or path, so the manifest can hash what the models were shown."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    return Path(str(resources.files("almost_ray.prompts").joinpath(f"{source}.txt")))


def role_header(role_cfg, field: str) -> str:
    try:
        return fewshot_header(load_prompt_text(role_cfg.prompt), role_cfg.shots)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"rmsp.{field}: {err}") from None


def shares_generator(cfg: RMSPConfig) -> bool:
    """The assistant and the user run on one set of replicas when both roles have the same model and the
    same resources: one model load per replica instead of two, and one copy of the model in memory.
    The dialogues are the same bytes (every prompt's samples are seeded by the prompt, not the replica)."""
    return cfg.max_turns > 1 and cfg.assistant.model == cfg.user.model and cfg.assistant.resources == cfg.user.resources


def role_pools(cfg: RMSPConfig, rm_ref: str | None, headers: dict[str, str]) -> dict[str, ReplicaSet]:
    """A `ReplicaSet` per role (assistant, RM, user; the assistant's and the user's may be one set,
    `shares_generator`), each started at its first use and reused by every turn: a role's model is
    loaded once per run, not once per turn."""
    a, u = cfg.assistant, cfg.user
    spec = {"assistant": {"sampling": {**a.sampling.model_dump(), "n": samples_per_turn(cfg)},
                          "header": headers["assistant"]},
            "user": {"sampling": u.sampling.model_dump(), "header": headers["user"]}}

    def generators(role_cfg, roles: list[str], field: str) -> ReplicaSet:
        kwargs = dict(answer=turns.answer_role, model=generator_model(role_cfg.model),
                      options=dict(roles={r: spec[r] for r in roles}))
        return ReplicaSet(ModelReplica, kwargs, role_cfg.resources, f"rmsp.{field}.resources")

    shared = shares_generator(cfg)
    sets = {"assistant": generators(a, ["assistant", "user"] if shared else ["assistant"], "assistant")}
    if rm_ref is not None:
        rm = cfg.reward_model
        model = reward_model(rm_ref, rm.dtype, rm.max_length, max(rm.resources.batch_size, samples_per_turn(cfg)))
        sets["reward_model"] = ReplicaSet(ModelReplica, dict(answer=turns.score_candidates, model=model), rm.resources,
                                          "rmsp.reward_model.resources")
    if cfg.max_turns > 1:
        sets["user"] = sets["assistant"] if shared else generators(u, ["user"], "user")
    return sets


def distinct(sets: dict[str, ReplicaSet]) -> dict[str, ReplicaSet]:
    """Each replica set once, named by the roles it plays (`assistant+user` when they share one)."""
    roles: dict[int, list[str]] = {}
    for role, replica_set in sets.items():
        roles.setdefault(id(replica_set), []).append(role)
    return {"+".join(roles[id(s)]): s for s in {id(s): s for s in sets.values()}.values()}


def selfplay(rows: Iterable[dict], sets: dict[str, ReplicaSet], max_turns: int, together: bool) -> Iterator[dict]:
    """Every dialogue through its turns: per turn the assistant's N samples, the RM's scores, best-of-N,
    then (before the last turn) the user's follow-up.

    `together` (all roles' replicas fit the cluster at once): the roles' maps are chained, so a dialogue
    moves on as soon as its batch is done and every replica works at the same time. Otherwise the roles
    take turns: each role's replicas start, answer every dialogue of this turn, and are freed before
    the next role's start — nothing stalls waiting for resources, at the price of loading each role's
    model once per turn instead of once per run (`docs/architecture.md`, Scale-out).
    """
    def step(pool: str, stream: Iterable[dict], **call) -> Iterable[dict]:
        if together:
            return sets[pool].map(stream, **call)
        with sets[pool]:
            return list(sets[pool].map(stream, **call))

    stream: Iterable[dict] = rows
    for turn in range(1, max_turns + 1):
        stream = step("assistant", stream, role="assistant")
        if "reward_model" in sets:
            stream = step("reward_model", stream)
        stream = map(partial(turns.take_assistant_turn, turn=turn, max_turns=max_turns), stream)  # binds this turn
        if turn < max_turns:
            stream = map(turns.take_user_turn, step("user", stream, role="user"))
    yield from stream


def run_meta(cfg: RMSPConfig, rm_ref: str | None) -> dict:
    """The switches of this run, copied into every record (ALMoST Table 5: RMSP vs self-play, prompts)."""
    return {
        "mode": mode(cfg),
        "best_of": samples_per_turn(cfg),
        "reward_model": rm_ref,
        "assistant_model": cfg.assistant.model.ref,
        "assistant_prompt": cfg.assistant.prompt,
        "assistant_shots": cfg.assistant.shots,
        "user_model": cfg.user.model.ref,
        "user_prompt": cfg.user.prompt,
        "user_shots": cfg.user.shots,
    }


def _inputs(cfg: Config) -> dict[str, Path | str]:
    r = cfg.rmsp
    inputs: dict[str, Path | str] = {"queries": paths.rmsp_queries(cfg), "assistant_prompt": prompt_file(r.assistant.prompt),
                                     "user_prompt": prompt_file(r.user.prompt)}
    if (rm := paths.local_model_path(paths.rmsp_reward_model(cfg))) is not None:
        inputs["reward_model"] = rm
    return inputs


def load_rmsp_queries(cfg: Config) -> list:
    return load_queries(paths.rmsp_queries(cfg))[: cfg.rmsp.num_queries]


def check(cfg: Config) -> None:
    """The queries, both roles' prompts and generators, and the RM, before Ray starts or a model loads."""
    r = cfg.rmsp
    require(paths.rmsp_queries(cfg), "rmsp.queries", None if r.queries else "queries")
    load_rmsp_queries(cfg)
    role_header(r.assistant, "assistant.prompt")
    role_header(r.user, "user.prompt")
    check_model_ref(r.assistant.model.ref, "rmsp.assistant.model.ref")
    check_model_ref(r.user.model.ref, "rmsp.user.model.ref")
    if (rm := paths.rmsp_reward_model(cfg)) is not None:
        check_model_ref(rm, "rmsp.reward_model.ref", "reward_model",
                        made_by=None if r.reward_model.ref else "train-rm")


def work(cfg: Config) -> Outcome:
    """Self-play every query into `dialogues.jsonl` (and `dropped.jsonl`), resuming finished shards."""
    r, stage_dir = cfg.rmsp, paths.stage_dir(cfg, "rmsp")
    started = time.time()
    rm_ref = paths.rmsp_reward_model(cfg)
    headers = {"assistant": role_header(r.assistant, "assistant.prompt"), "user": role_header(r.user, "user.prompt")}
    query_rows = load_rmsp_queries(cfg)
    # Shards are keyed by config and inputs: a changed config never resumes from another's shards.
    key = hashlib.sha256(json.dumps([config_hash(r), {k: input_hash(v) for k, v in _inputs(cfg).items()}]).encode())
    trace = stage_dir / f"selfplay-{key.hexdigest()[:12]}.jsonl"
    _remove_stale(stage_dir, trace)
    meta = run_meta(r, rm_ref)
    replicas_started: dict[str, int] = {}  # per replica set: model loads in this process (once per run when they fit)
    timing: dict = {"prepare_s": round(time.time() - started, 2)}  # where the stage's wall time went
    if not trace.exists():
        shards = ShardedJsonl(trace, r.shard_size)
        todo = shards.pending([turns.start_row(q.id, q.text) for q in query_rows])
        if todo:
            init_ray(cfg.ray)
            sets = role_pools(r, rm_ref, headers)
            pools = distinct(sets)
            for replica_set in pools.values():  # each role alone must fit, or the stage stops here, in seconds
                preflight(replica_set.name, pool_bundles(replica_set.res))
            together = fits_together({s.name: pool_bundles(s.res) for s in pools.values()})
            t0 = time.time()
            try:
                records = (
                    {**turns.dialogue_record(row, meta), SHARD_KEY: int(row[SHARD_KEY]), ROW_KEY: int(row[ROW_KEY])}
                    for row in selfplay(todo, sets, r.max_turns, together)
                )
                shards.collect(_progress(records, len(todo), stage_dir / "metrics.jsonl", r, started))
            finally:
                for replica_set in pools.values():
                    replica_set.close()
            timing["selfplay_s"] = round(time.time() - t0, 2)
            timing["roles_together"] = together
            timing["replicas"] = {name: {call: {k: round(v, 2) for k, v in w.items()} for call, w in s.work.items()}
                                  for name, s in pools.items()}
            replicas_started = {name: s.started for name, s in pools.items()}
        shards.finalize()
    t0 = time.time()
    records = _split(trace, paths.dialogues_file(cfg), stage_dir / "dropped.jsonl")
    timing["write_s"] = round(time.time() - t0, 2)
    trace.unlink()  # a crash before the manifest re-splits nothing: the dialogues are whole on disk
    counts = {
        "queries": len(query_rows),
        "dialogues": sum(rec["num_turns"] > 0 for rec in records),
        "dropped": sum(rec["num_turns"] == 0 for rec in records),
        f"complete_{r.max_turns}_turn": sum(rec["num_turns"] == r.max_turns for rec in records),
        **turns.end_counts(records),
    }
    metrics = {"switches": meta, "per_turn": turns.turn_metrics(records, r.max_turns),
               "replicas_started": replicas_started, "timing": timing}
    return Outcome(counts=counts, metrics=metrics)


STAGE = Stage(
    "rmsp", "reward-model-guided self-play -> SFT dialogues (ALMoST step 2)",
    section=lambda c: c.rmsp, inputs=_inputs,
    outputs=lambda c: {"dialogues": paths.dialogues_file(c)},
    work=work, check=check,
    headline=("counts.queries", "counts.dialogues", "counts.complete_*", "metrics.per_turn.*.mean_chosen_reward"),
)


def run(cfg: Config) -> Path:
    """Self-play into `<run dir>/rmsp/dialogues.jsonl`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)


def _remove_stale(stage_dir: Path, keep: Path) -> None:
    """Drop traces and shards of an earlier config, so a changed config starts clean."""
    if not stage_dir.exists():
        return
    for p in stage_dir.glob("selfplay-*.jsonl"):
        if p != keep:
            p.unlink()
    for p in stage_dir.glob(".selfplay-*.jsonl.shards"):
        if p.name != f".{keep.name}.shards":
            remove_own_directory(p)


def _split(trace: Path, dialogues: Path, dropped: Path) -> list[dict]:
    """Stream the finished trace into the SFT set and the dropped queries; return slim records for counts."""
    slim = []
    with atomic_open(dialogues) as keep, atomic_open(dropped) as drop:
        for rec in read_rows(trace):
            (keep if rec["num_turns"] > 0 else drop).write(json.dumps(rec, ensure_ascii=False) + "\n")
            slim.append(_slim(rec))
    return slim


def _slim(rec: dict) -> dict:
    """What the counts and reward metrics need, without the texts (a big run keeps only this in memory)."""
    return {"end_reason": rec["end_reason"], "num_turns": rec["num_turns"],
            "assistant_turns": [{k: t[k] for k in ("turn", "scores", "chosen")} for t in rec["assistant_turns"]]}


def _progress(records: Iterable[dict], total: int, metrics_path: Path, cfg: RMSPConfig, started: float) -> Iterator[dict]:
    """Pass records through while showing a progress bar and appending running metrics a person can plot."""
    seen: list[dict] = []
    every = max(1, min(cfg.shard_size, total // 10 or 1))
    run, stage = run_of(metrics_path.parent), metrics_path.parent.name
    with tqdm(total=total, desc="rmsp dialogues", unit="dlg") as bar:
        for rec in records:
            seen.append(_slim(rec))
            bar.update(1)
            add_counts(run, stage, {"dialogues_done": 1, "dialogues_kept": int(rec["num_turns"] > 0)})
            progress(run, stage, len(seen), total)
            if len(seen) % every == 0 or len(seen) == total:
                line = {"done": len(seen), "of": total, "elapsed_s": round(time.time() - started, 1),
                        "per_turn": turns.turn_metrics(seen, cfg.max_turns), **turns.end_counts(seen)}
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
            yield rec
