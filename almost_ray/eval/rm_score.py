"""The optional `rm_score` stage (`almost-ray pipeline --with rm_score`): the RM's mean score of every model's
answers to the same held-out prompts.

PPO and GRPO maximise the RM's score on their training prompts, DPO optimises the same preferences without
an RM; this asks which of base, SFT, PPO, GRPO and DPO the RM prefers on prompts it was never trained on:
by default the queries of train_rm's held-out comparisons (`rm/heldout_comparisons.jsonl`). Each model that
exists samples `samples_per_prompt` answers per prompt (the generate stage, seeded per prompt and sample,
so every model gets the same seeds), in the format it was trained on (`train_sft.prompt_format`; the base
model in `generate.prompt_format`); one RM pool scores every answer (`models.reward.score_conversations`).

Output `<run>/rm_score/rm_score.json`: per model the mean over prompts of its per-prompt mean score, the
standard error over prompts, and the paired difference to the SFT model on the same prompts
(`eval/stats.py`); which training stages also saw these prompts (`seen_in_training`), so a reader knows
what "held out" means for each model. Models that do not exist are listed under `not_run`, never faked.
"""

from __future__ import annotations

import json
from pathlib import Path

from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.pools import stream_pool
from almost_ray.cluster.replicas import ModelReplica, reward_model
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.atomic import write_json
from almost_ray.data.preferences import load_pairs
from almost_ray.data.records import Response, write_jsonl
from almost_ray.data.sources import read_rows, require
from almost_ray.eval.stage import missing_model, models
from almost_ray.eval.stats import mean_over_prompts, paired_difference
from almost_ray.generate import stage as generate
from almost_ray.models.loading import check_model_ref, resolve_model_dir
from almost_ray.models.reward import score_conversations
from almost_ray.rl.prompt_data import load_prompts
from almost_ray.runs import paths
from almost_ray.runs.manifest import reset_if_changed
from almost_ray.runs.stage import Outcome, Stage


def prompts(cfg: Config) -> list[tuple[str, str]]:
    """(id, text) of each distinct prompt to answer, in file order, the first `rm_score.limit`."""
    source = paths.rm_score_prompts(cfg)
    if source is None:
        raise ConfigError("rm_score.prompts: no held-out prompts: set train_rm.heldout_fraction > 0, or give "
                          "rm_score.prompts")
    require(source, "rm_score.prompts", None if cfg.rm_score.prompts else "train-rm")
    found: dict[str, str] = {}
    for row in generate.read_prompts(source):  # queries, or comparison rows (their `prompt`, `query_id`)
        text = row["messages"][0]["content"]
        found.setdefault(text, row["id"])
    return [(i, t) for t, i in found.items()][: cfg.rm_score.limit]


def seen_in_training(cfg: Config, texts: list[str]) -> dict[str, int]:
    """How many of the prompts each training input also holds: PPO's prompts (ppo and ppo_grpo) and the
    pairs DPO trained on, when those files exist."""
    wanted = set(texts)
    seen: dict[str, int] = {}
    ppo_prompts = paths.ppo_prompts(cfg)
    if Path(str(ppo_prompts)).exists():
        seen["ppo and ppo_grpo prompts"] = len(wanted & set(load_prompts(ppo_prompts)))
    if models(cfg)["dpo"] is not None and Path(str(paths.train_dpo_comparisons(cfg))).exists():
        dpo = {p.chosen[0]["content"] for p in load_pairs(paths.train_dpo_comparisons(cfg))}
        seen["DPO's preference pairs"] = len(wanted & dpo)
    return seen


def answer(cfg: Config, name: str, ref: str, prompts_file: Path) -> dict[str, list[str]]:
    """prompt id -> the answers `name` samples (the generate stage; skipped when done, redone when the model
    at `ref` changed)."""
    s = cfg.rm_score
    out_dir = paths.stage_dir(cfg, "rm_score") / name
    reset_if_changed(out_dir, [p for p in [paths.local_model_path(ref)] if p is not None])
    gen = cfg.generate.model_copy(update={
        "model": cfg.generate.model.model_copy(update={"ref": ref}),
        "sampling": s.sampling.model_copy(update={"n": s.samples_per_prompt}),
        "prompt_format": cfg.generate.prompt_format if name == "base" else cfg.train_sft.prompt_format,
        "prompts": str(prompts_file), "output": out_dir / "responses.jsonl",
    })
    generate.run(cfg.model_copy(update={"generate": gen}))
    return {r.query_id: r.responses for r in read_rows(out_dir / "responses.jsonl", Response)}


def score(cfg: Config, texts: dict[str, str], answers: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list]]:
    """model -> prompt id -> the RM's score of each answer, on one pool (the RM loaded once per replica)."""
    rows = [{"key": json.dumps([name, pid, k]),
             "conversation": json.dumps([{"role": "user", "content": texts[pid]},
                                         {"role": "assistant", "content": a}])}
            for name, by_prompt in answers.items() for pid, samples in by_prompt.items()
            for k, a in enumerate(samples)]
    rows.sort(key=lambda r: len(r["conversation"]))  # similar lengths per batch: less padding
    s = cfg.rm_score
    kwargs = dict(answer=score_conversations, model=reward_model(paths.rm_score_reward_model(cfg), max_length=s.max_length,
                                                          batch_size=s.resources.batch_size))
    scores: dict[str, dict[str, list]] = {name: {pid: [None] * len(v) for pid, v in by.items()}
                                         for name, by in answers.items()}
    for r in stream_pool(rows, ModelReplica, kwargs, s.resources, "rm_score.resources"):
        name, pid, k = json.loads(r["key"])
        scores[name][pid][k] = float(r["reward"])
    return scores


def check(cfg: Config) -> None:
    """The prompts, the RM (one score) and the base model, before Ray starts."""
    prompts(cfg)
    check_model_ref(paths.rm_score_reward_model(cfg), "rm_score.reward_model", "reward_model",
                    made_by=None if cfg.rm_score.reward_model else "train-rm")
    check_model_ref(cfg.train_sft.model, "train_sft.model")


def work(cfg: Config) -> Outcome:
    """Every existing model answers the same prompts, the RM scores all answers; `rm_score.json`."""
    stage_dir = paths.stage_dir(cfg, "rm_score")
    asked = prompts(cfg)
    texts = dict(asked)
    prompts_file = stage_dir / "prompts.jsonl"
    write_jsonl(prompts_file, ({"id": i, "text": t} for i, t in asked))
    refs = models(cfg)
    resolve_model_dir(paths.rm_score_reward_model(cfg))  # a GGUF is converted once here, not in every replica
    init_ray(cfg.ray)
    answers = {name: answer(cfg, name, ref, prompts_file) for name, ref in refs.items() if ref is not None}
    scores = score(cfg, texts, answers)
    results = {name: mean_over_prompts(by_prompt) for name, by_prompt in scores.items()}
    if "sft" in scores:
        for name in scores:
            if name != "sft":
                results[name]["vs_sft"] = paired_difference(scores[name], scores["sft"])
    s = cfg.rm_score
    write_json(paths.rm_score_file(cfg), {
        "prompts": {"source": str(paths.rm_score_prompts(cfg)), "ids": [i for i, _ in asked],
                    "seen_in_training": seen_in_training(cfg, list(texts.values()))},
        "reward_model": paths.rm_score_reward_model(cfg), "samples_per_prompt": s.samples_per_prompt,
        "sampling": s.sampling.model_dump(mode="json"), "models": {k: v for k, v in refs.items() if v is not None},
        "results": results, "scores": scores,
        "not_run": {name: missing_model(name) for name, ref in refs.items() if ref is None},
    })
    return Outcome(counts={"prompts": len(asked), "models": len(answers),
                           "answers": sum(len(v) for by in answers.values() for v in by.values())},
                   metrics={name: {k: r[k] for k in ("mean", "se")} for name, r in results.items()})


def _inputs(cfg: Config) -> dict[str, Path | str]:
    found = {f"model_{k}": p for k, ref in models(cfg).items() if ref and (p := paths.local_model_path(ref))}
    if (rm := paths.local_model_path(paths.rm_score_reward_model(cfg))) is not None:
        found["reward_model"] = rm
    if (source := paths.rm_score_prompts(cfg)) is not None:
        found["prompts"] = source
    return found


STAGE = Stage(
    "rm_score", "optional: the RM's mean score of every model's answers to the same held-out prompts",
    section=lambda c: c.rm_score, inputs=_inputs,
    outputs=lambda c: {"report": paths.rm_score_file(c)},
    work=work, check=check, headline=("counts.*", "metrics.*.mean"),
)


def run(cfg: Config) -> Path:
    """Every model's RM score on held-out prompts into `<run dir>/rm_score/`; skipped when up to date."""
    return STAGE.run(cfg)
