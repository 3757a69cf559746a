"""The `evaluate` stage (`almost-ray eval`): the configured suites on one model (and the judge against
`vs`), with its report. The pipeline's `eval` stage (`eval/stage.py`) runs it for the base, SFT and PPO models.

Each suite builds scoring rows from its data (pure, in its own module), a scorer turns them into
log-likelihoods (or rewards) on a Ray Data actor pool, and the suite summarises them. Outputs go to
`runs/<run>/eval/<model>/`: `report.json`, `report.md`, a PNG per suite, `<suite>/items.jsonl` (one
record per item, to inspect), `metrics.jsonl` (one line per finished suite) and the resumable score
shards; `manifest.json` last. A re-run with the same config and data reuses every finished score file.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.connect import init_ray
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.atomic import atomic_open
from almost_ray.data.shards import ShardedJsonl
from almost_ray.data.sources import read_rows
from almost_ray.eval import hhh, judge, ranking, truthfulqa
from almost_ray.eval.config import EvalConfig, JudgeEvalConfig
from almost_ray.eval.report import write_report
from almost_ray.eval.scoring import Scorer, reward_on_ray, score_in_process, score_on_ray
from almost_ray.generate.pool import stream_generation
from almost_ray.models.config import ModelConfig
from almost_ray.models.generator import make_generator
from almost_ray.models.loading import check_model_ref, load_tokenizer
from almost_ray.prompts.templates import default_stop, render_prompt
from almost_ray.runs import paths
from almost_ray.runs.stage import Outcome, Stage

Answerer = Callable[[ModelConfig, list[dict], str], dict[str, str]]  # (model, questions, name) -> id -> answer


@dataclass
class Backends:
    """Where the work runs: scorers for the evaluated model and the judge, and an answer generator."""

    score: Scorer
    answer: Answerer | None = None
    judge: Scorer | None = None


def model_label(model: ModelConfig) -> str:
    label = model.ref
    if model.num_layers is not None:
        label += f"[{model.num_layers} layers]"
    if model.rules.enabled:
        label += "+rules"
    return label


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", label).strip("-")


def _data_paths(ecfg: EvalConfig) -> dict[str, Path]:
    """The data files of the requested suites; a missing setting or file is a config error naming the field."""
    wanted = {"hhh": ("eval.hhh.data", ecfg.hhh.data), "truthfulqa": ("eval.truthfulqa.data", ecfg.truthfulqa.data),
              "ranking": ("eval.ranking.data", ecfg.ranking.data)}
    paths = {}
    for suite in ecfg.suites:
        if suite == "judge":
            if not ecfg.judge.questions:
                raise ConfigError("eval.judge.questions: no question sets configured (name: path.jsonl)")
            for name, path in ecfg.judge.questions.items():
                paths[f"judge.{name}"] = path
            continue
        field, path = wanted[suite]
        if path is None:
            raise ConfigError(f"{field}: not set; point it at the suite's data file (see docs/evaluation.md)")
        paths[suite] = path
    for key, path in paths.items():
        if not Path(path).is_file():
            raise ConfigError(f"eval.{key.replace('judge.', 'judge.questions.')}: file not found: {path}")
    if "judge" in ecfg.suites and ecfg.vs is None:
        raise ConfigError("eval.vs: the judge suite compares two models; give --vs REF (or eval.vs.ref)")
    if ecfg.kind == "reward":
        unsupported = {"ranking", "judge"} & set(ecfg.suites)
        if "hhh" in ecfg.suites and ecfg.hhh.mode != "answer":
            unsupported.add("hhh (mode: letter)")
        if "truthfulqa" in ecfg.suites and ecfg.truthfulqa.mode != "answer":
            unsupported.add("truthfulqa (mode: true_false)")
        if unsupported:
            raise ConfigError(f"eval.kind: a reward model scores hhh and truthfulqa in answer mode only, "
                              f"not {', '.join(sorted(unsupported))}")
    return paths


def apply_cli(cfg: Config, model: str | None, suites: str | None, vs: str | None, reward: bool = False) -> Config:
    """`--model`, `--suite`, `--vs`, `--reward-model` applied over the config (validated like the file).

    `--vs REF` without an `eval.vs` section compares with REF loaded like `--model` but without the
    rules adapter, so `--model M --vs M --set eval.model.rules.enabled=true` is "M with rules vs M".
    """
    e = cfg.eval.model_dump()
    if model:
        e["model"]["ref"] = model
    if suites:
        e["suites"] = [s.strip() for s in suites.split(",") if s.strip()]
    if vs:
        base = e["vs"] if e["vs"] is not None else {**e["model"], "rules": {"enabled": False}}
        e["vs"] = {**base, "ref": vs}
    if reward:
        e["kind"] = "reward"
    try:
        return cfg.model_copy(update={"eval": EvalConfig.model_validate(e)})
    except ValueError as err:
        fields = "; ".join(f"eval.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in err.errors())
        raise ConfigError(f"command line: {fields}") from None


def answer_on_ray(jcfg: JudgeEvalConfig, resources: ResourcesConfig, work_dir: Path, shard_size: int) -> Answerer:
    """Answers to the judge's questions from a `GenerationReplica` pool, cached by a digest of the request."""

    def answer(model: ModelConfig, questions: list[dict], name: str) -> dict[str, str]:

        sampling = jcfg.sampling
        if not sampling.stop:
            sampling = sampling.model_copy(update={"stop": default_stop(jcfg.prompt_format)})
        rows = [{"id": q["id"], "messages": json.dumps([{"role": "user", "content": q["question"]}])}
                for q in questions]
        blob = json.dumps([model.model_dump(mode="json"), sampling.model_dump(), jcfg.prompt_format, rows])
        final = work_dir / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.answers.jsonl"
        if not final.is_file():
            shards = ShardedJsonl(final, shard_size)
            todo = shards.pending(rows)
            if todo:
                shards.collect({"id": r["id"], "answer": r["responses"][0], "_shard": r["_shard"], "_row": r["_row"]}
                               for r in stream_generation(todo, model, sampling, resources, jcfg.prompt_format,
                                                            pool="eval.resources"))
            shards.finalize()
        return {r["id"]: r["answer"] for r in read_rows(final)}

    return answer


def in_process_backends(cfg: Config) -> Backends:
    """Everything in this process, no Ray (tests, notebooks): one generator per distinct model config."""

    e = cfg.eval
    if e.kind == "reward" or e.judge.kind == "reward":
        raise ConfigError("eval.kind: in-process evaluation covers language models; reward models run on Ray")
    cache: dict[str, object] = {}

    def generator(model: ModelConfig):
        key = model.model_dump_json()
        if key not in cache:
            cache[key] = make_generator(model)
        return cache[key]

    def answer(model: ModelConfig, questions: list[dict], name: str) -> dict[str, str]:
        gen = generator(model)
        sampling = e.judge.sampling
        if not sampling.stop:
            sampling = sampling.model_copy(update={"stop": default_stop(e.judge.prompt_format)})
        prompts = [render_prompt(e.judge.prompt_format, [{"role": "user", "content": q["question"]}],
                                 getattr(gen, "tokenizer", None)) for q in questions]
        # a question skipped as too long (model.on_overlong: skip) gets an empty answer
        return {q["id"]: out[0] if out else "" for q, out in zip(questions, gen.generate(prompts, sampling))}

    judge_scorer = score_in_process(generator(e.judge.model)) if "judge" in e.suites else None
    return Backends(score_in_process(generator(e.model)), answer, judge_scorer)


def ray_backends(cfg: Config, work_dir: Path) -> Backends:

    init_ray(cfg.ray)
    e = cfg.eval
    if e.kind == "reward":
        score = reward_on_ray(e.model.ref, e.resources, work_dir, e.shard_size, e.model.dtype)
    else:
        score = score_on_ray(e.model, e.resources, work_dir, e.shard_size)
    judge_scorer = None
    if "judge" in e.suites:
        if e.judge.kind == "reward":
            if not e.judge.reward_model:
                raise ConfigError("eval.judge.reward_model: required when eval.judge.kind is 'reward'")
            judge_scorer = reward_on_ray(e.judge.reward_model, e.resources, work_dir, e.shard_size)
        else:
            judge_scorer = score_on_ray(e.judge.model, e.resources, work_dir, e.shard_size)
    return Backends(score, answer_on_ray(e.judge, e.resources, work_dir, e.shard_size), judge_scorer)


def _tokenizer(ref: str, needed: bool):
    if not needed:
        return None

    return load_tokenizer(ref)


def _write_items(path: Path, records: list[dict]) -> None:
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def load_suite_items(suite: str, e: EvalConfig) -> list:
    """A suite's items, every row validated (a bad row is a RecordError naming file:line and field)."""
    if suite == "hhh":
        return hhh.load_items(e.hhh.data, e.hhh.limit)
    if suite == "truthfulqa":
        return truthfulqa.load_items(e.truthfulqa.data, e.truthfulqa.limit)
    if suite == "ranking":
        return ranking.load_pairs(e.ranking.data, e.ranking.max_chars, e.ranking.limit)
    if suite == "judge":
        return [q for name, path in e.judge.questions.items() for q in judge.load_questions(path, name, e.judge.limit)]
    raise ValueError(f"unknown suite {suite!r}")


def run_suite(suite: str, e: EvalConfig, backends: Backends, tokenizer=None) -> tuple[dict, list[dict]]:
    """One suite: rows, scores, summary."""
    items = load_suite_items(suite, e)
    if suite == "hhh":
        return hhh.summarize(items, backends.score(hhh.build_rows(items, e.hhh, tokenizer), "hhh"), e.hhh.mode)
    if suite == "truthfulqa":
        scores = backends.score(truthfulqa.build_rows(items, e.truthfulqa, tokenizer), "truthfulqa")
        return truthfulqa.summarize(items, scores, e.truthfulqa)
    if suite == "ranking":
        rows = ranking.build_rows(items, e.ranking, tokenizer)
        return ranking.summarize(rows, backends.score(rows, "ranking"))
    return run_judge(e, backends, items)


def run_judge(e: EvalConfig, backends: Backends, questions: list[dict]) -> tuple[dict, list[dict]]:
    j = e.judge
    answers_a = backends.answer(e.model, questions, f"answers-{slug(model_label(e.model))}")
    answers_b = backends.answer(e.vs, questions, f"answers-{slug(model_label(e.vs))}")
    if j.kind == "reward":
        rows = judge.reward_rows(questions, answers_a, answers_b)
        judge_label = f"reward model {j.reward_model}"
    else:
        rows = judge.build_rows(questions, answers_a, answers_b, j,
                                _tokenizer(j.model.ref, j.prompt.style == "chat"))
        judge_label = f"{model_label(j.model)} prompted for a verdict (p(A) vs p(B))"
    records = judge.outcomes(questions, backends.judge(rows, "judge"), j)
    for r in records:
        r.update(question=next(q["question"] for q in questions if q["id"] == r["id"]),
                 answer_a=answers_a[r["id"]], answer_b=answers_b[r["id"]])
    metrics = {**judge.summarize(records), "vs_label": model_label(e.vs), "judge_kind": j.kind,
               "judge_label": judge_label, "tie_margin": j.tie_margin, "decision": j.decision,
               "answers": {"a": judge.answer_stats(answers_a), "b": judge.answer_stats(answers_b)}}
    return metrics, records


def folder(cfg: Config) -> Path:
    """Where one model's evaluation goes: `eval.output_dir` (the CLI's `--output`), else
    `<eval stage folder>/<model label>`."""
    if cfg.eval.output_dir is not None:
        return Path(cfg.eval.output_dir)
    return paths.stage_dir(cfg, "eval") / slug(model_label(cfg.eval.model))


def check(cfg: Config) -> None:
    """The suites' data (every row) and every model the evaluation loads, before Ray starts."""
    e = cfg.eval
    _data_paths(e)
    for suite in e.suites:
        load_suite_items(suite, e)
    check_model_ref(e.model.ref, "eval.model.ref", "reward_model" if e.kind == "reward" else "causal_lm")
    if "judge" in e.suites:
        check_model_ref(e.vs.ref, "eval.vs.ref")
        if e.judge.kind == "reward":
            if not e.judge.reward_model:
                raise ConfigError("eval.judge.reward_model: required when eval.judge.kind is 'reward'")
            check_model_ref(e.judge.reward_model, "eval.judge.reward_model", "reward_model")
        else:
            check_model_ref(e.judge.model.ref, "eval.judge.model.ref")


def evaluate(cfg: Config, backends: Backends | None = None) -> Outcome:
    """Evaluate `cfg.eval.model` on `cfg.eval.suites` into `folder(cfg)`: report.json/md, PNGs, items.
    `backends`: where scoring runs (default: Ray Data pools; `in_process_backends` for tests)."""
    e = cfg.eval
    out_dir = folder(cfg)
    started = time.time()
    backends = backends or ray_backends(cfg, out_dir)
    chat = (e.hhh.prompt.style == "chat" or e.hhh.answer_prompt.style == "chat" or e.ranking.style == "chat"
            or e.truthfulqa.prompt.style == "chat" or e.truthfulqa.true_false_prompt.style == "chat")
    tokenizer = _tokenizer(e.model.ref, chat)
    report = {"model_label": model_label(e.model), "model": e.model.model_dump(mode="json"), "kind": e.kind,
              "ci": "wilson-95", "suites": {}}
    for suite in e.suites:
        t0 = time.time()
        metrics, records = run_suite(suite, e, backends, tokenizer)
        metrics["wall_time_s"] = round(time.time() - t0, 1)
        report["suites"][suite] = metrics
        (out_dir / suite).mkdir(parents=True, exist_ok=True)
        _write_items(out_dir / suite / "items.jsonl", records)
        with (out_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "suite": suite, **_headline(suite, metrics)}) + "\n")
    report["wall_time_s"] = round(time.time() - started, 1)
    write_report(report, out_dir)
    return Outcome(counts={s: m.get("n_items", m.get("overall", {}).get("n")) for s, m in report["suites"].items()},
                   metrics={s: _headline(s, m) for s, m in report["suites"].items()})


STAGE = Stage(
    "evaluate", "one model on the configured suites (Static HHH, TruthfulQA MC1, ranking, judge)",
    section=lambda c: c.eval, inputs=lambda c: _data_paths(c.eval),
    outputs=lambda c: {"report": folder(c) / "report.json"},
    work=evaluate, check=check, folder=folder,
)


def run(cfg: Config) -> Path:
    """`almost-ray eval`: one model's evaluation into `folder(cfg)`; skipped when up to date."""
    return STAGE.run(cfg)


def _headline(suite: str, m: dict) -> dict:
    key = {"hhh": "accuracy", "truthfulqa": "accuracy", "ranking": "ranking_capability"}.get(suite)
    if key:
        return {"value": m[key]["value"], "ci_low": m[key]["ci_low"], "ci_high": m[key]["ci_high"], "n": m[key]["n"],
                "wall_time_s": m.get("wall_time_s")}
    o = m["overall"]
    return {"win": o["win"]["value"], "tie": o["tie"]["value"], "loss": o["loss"]["value"], "n": o["n"],
            "wall_time_s": m.get("wall_time_s")}
