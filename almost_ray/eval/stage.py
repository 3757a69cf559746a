"""The pipeline's eval stage: what each step of alignment changed, measured (ALMoST Section 3).

- the base model (`train_sft.model`), the SFT model and the PPO model, and the models of the optional
  stages when they ran (`ppo_grpo`: PPO with a critic-free estimator; `train_dpo`: DPO), each on the
  same suites of `eval.suites` that score one model (Static HHH, TruthfulQA MC1, ranking) and the same
  items, each a run of the `evaluate` stage (`eval/evaluate.py`) into `<run>/eval/<name>/`;
- the PPO model against the SFT model under the order-swapped judge (`eval.judge`; both models answer in
  the format they were trained on, `train_sft.prompt_format`) into `<run>/eval/ppo-vs-sft/`;
- RMSP against plain self-play, scored by the same RM (`rmsp/vs_self_play.py`, ALMoST Table 5) into
  `<run>/rmsp-compare/`.

A model that does not exist yet (no PPO stage, an SFT not trained, an optional stage not asked for) or a
suite whose third-party data is absent is not faked: `summary.json` lists it under `not_run` with the reason, and the report says so.
Each evaluation is skipped when already done; a retrained model invalidates its folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from almost_ray.config import Config
from almost_ray.data.atomic import write_json
from almost_ray.eval import evaluate
from almost_ray.eval.config import EvalConfig
from almost_ray.eval.evaluate import load_suite_items
from almost_ray.models.loading import check_model_ref
from almost_ray.rmsp import stage as rmsp
from almost_ray.rmsp.vs_self_play import run_compare
from almost_ray.runs import paths
from almost_ray.runs.manifest import read_manifest, reset_if_changed
from almost_ray.runs.stage import Outcome, Stage

SINGLE_MODEL_SUITES = ("hhh", "truthfulqa", "ranking")
# the trained models: name -> (where its stage writes it, why it may be missing)
TRAINED: dict[str, tuple[Callable[[Config], Path], str]] = {
    "sft": (paths.sft_model, "the train_sft stage has not run"),
    "ppo": (paths.ppo_model, "the ppo stage has not run"),
    "ppo_grpo": (paths.ppo_grpo_model, "the optional ppo_grpo stage has not run (almost-ray pipeline --with ppo_grpo)"),
    "dpo": (paths.dpo_model, "the optional train_dpo stage has not run (almost-ray pipeline --with train_dpo)"),
}
MODEL_NAMES = ("base", *TRAINED)


def models(cfg: Config) -> dict[str, str | None]:
    """base, sft, ppo, ppo_grpo, dpo -> model reference, or None when that model has not been trained."""
    found = {name: where(cfg) for name, (where, _) in TRAINED.items()}
    return {"base": cfg.train_sft.model,
            **{name: str(p) if (p / "config.json").is_file() else None for name, p in found.items()}}


def missing_model(name: str) -> str:
    """Why a trained model is absent, for `not_run` and the report."""
    return f"no {name} model: {TRAINED[name][1]}"


def data_files(e: EvalConfig, suite: str) -> list[Path]:
    if suite == "judge":
        return [Path(p) for p in e.judge.questions.values()]
    return [Path(p)] if (p := getattr(e, suite).data) is not None else []


def missing_data(e: EvalConfig, suite: str) -> str | None:
    files = data_files(e, suite)
    if not files:
        return f"eval.{suite}: no data file configured"
    absent = [str(p) for p in files if not p.is_file()]
    return f"data not found: {', '.join(absent)} (third-party, see docs/evaluation.md)" if absent else None


def plan(cfg: Config) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(what runs: evaluation -> suites, what does not: key -> reason)."""
    e = cfg.eval
    refs = models(cfg)
    runs: dict[str, list[str]] = {}
    not_run: dict[str, str] = {}
    suites = [s for s in e.suites if s in SINGLE_MODEL_SUITES]
    for s in suites:
        if (why := missing_data(e, s)) is not None:
            not_run[s] = why
    usable = [s for s in suites if s not in not_run]
    for name, ref in refs.items():
        if ref is None:
            not_run[name] = missing_model(name)
        elif usable:
            runs[name] = usable
    if refs["ppo"] is None or refs["sft"] is None:
        not_run[paths.PPO_VS_SFT] = "needs both the PPO and the SFT model"
    elif (why := missing_data(e, "judge")) is not None:
        not_run[paths.PPO_VS_SFT] = why
    else:
        runs[paths.PPO_VS_SFT] = ["judge"]
    if rmsp.mode(cfg.rmsp) != "rmsp":
        not_run["rmsp_vs_self_play"] = "rmsp runs as plain self-play (no reward model or best_of 1)"
    elif read_manifest(paths.stage_dir(cfg, "rmsp")) is None:
        not_run["rmsp_vs_self_play"] = "the rmsp stage has not run"
    else:
        runs["rmsp_vs_self_play"] = []
    return runs, not_run


def notes(cfg: Config) -> list[str]:
    return [f"{key}: not run: {why}" for key, why in plan(cfg)[1].items()]


def _model_cfg(cfg: Config, name: str, suites: list[str]) -> Config:
    """`cfg` with `eval.model` pointing at one of the pipeline's models (`ppo` vs `sft` for the judge), its
    evaluation in `<eval folder>/<name>/`."""
    refs = models(cfg)
    e = cfg.eval
    update: dict = {"suites": suites, "output_dir": paths.stage_dir(cfg, "eval") / name}
    if name == paths.PPO_VS_SFT:
        update["model"] = e.model.model_copy(update={"ref": refs["ppo"]})
        update["vs"] = e.model.model_copy(update={"ref": refs["sft"], "rules": e.model.rules.model_copy(
            update={"enabled": False})})
        update["judge"] = e.judge.model_copy(update={"prompt_format": cfg.train_sft.prompt_format})
    else:
        update["model"] = e.model.model_copy(update={"ref": refs[name]})
    return cfg.model_copy(update={"eval": e.model_copy(update=update)})


def _inputs(cfg: Config) -> dict[str, Path]:
    runs = plan(cfg)[0]
    inputs = {f"model_{k}": p for k, ref in models(cfg).items() if ref and (p := paths.local_model_path(ref)) is not None}
    for suite in {s for suites in runs.values() for s in suites}:
        inputs.update({f"{suite}_{i}": p for i, p in enumerate(data_files(cfg.eval, suite))})
    if "rmsp_vs_self_play" in runs:
        inputs["dialogues"] = paths.dialogues_file(cfg)
    return inputs


def check(cfg: Config) -> None:
    """The base model, and every row of the suites' data that is present, before Ray starts."""
    check_model_ref(cfg.train_sft.model, "train_sft.model")
    runs, _ = plan(cfg)
    for suite in {s for suites in runs.values() for s in suites}:
        load_suite_items(suite, cfg.eval)


def work(cfg: Config) -> Outcome:
    """Every evaluation the plan allows into `<run>/eval/`, then `summary.json`."""
    stage_dir = paths.stage_dir(cfg, "eval")
    runs, not_run = plan(cfg)
    counts: dict = {}
    metrics: dict = {}
    refs = models(cfg)
    for name, suites in runs.items():
        if name == "rmsp_vs_self_play":
            report = run_compare(cfg)
            metrics[name] = {t: {k: row[k] for k in ("rmsp_mean_reward", "self_play_mean_reward", "mean_difference")}
                             for t, row in report["per_turn"].items()}
            counts[name] = {t: row["paired_dialogues"] for t, row in report["per_turn"].items()}
            continue
        sub = _model_cfg(cfg, name, suites)
        sources = [refs["ppo"], refs["sft"]] if name == paths.PPO_VS_SFT else [refs[name]]
        reset_if_changed(sub.eval.output_dir, [p for ref in sources if (p := paths.local_model_path(ref)) is not None])
        print(f"eval: {name} ({sub.eval.model.ref}) on {', '.join(suites)}", flush=True)
        m = read_manifest(evaluate.run(sub)) or {}
        counts[name], metrics[name] = m.get("counts", {}), m.get("metrics", {})
    summary = {"models": refs, "runs": runs, "not_run": not_run,
               "dirs": {**{name: str(stage_dir / name) for name in runs if name != "rmsp_vs_self_play"},
                        "rmsp_vs_self_play": str(paths.rmsp_vs_self_play_dir(cfg))},
               "subsets": subsets(cfg.eval)}
    write_json(paths.eval_summary_file(cfg), summary)
    return Outcome(counts=counts, metrics=metrics)


STAGE = Stage(
    "eval", "base vs SFT vs PPO (and GRPO, DPO when run) on Static HHH and TruthfulQA MC1, PPO vs SFT judge, "
    "RMSP vs self-play",
    section=lambda c: c.eval, inputs=_inputs,
    outputs=lambda c: {"summary": paths.eval_summary_file(c)},
    work=work, check=check, notes=notes,
    headline=("metrics.*.value", "metrics.*.win"),
)


def run(cfg: Config) -> Path:
    """The pipeline's evaluation into `<run dir>/eval/`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)


def subsets(e: EvalConfig) -> dict[str, str]:
    """Which part of each benchmark the config scores, in words, for the report."""
    def part(limit: int | None, unit: str) -> str:
        return f"the first {limit} {unit}" if limit else f"all {unit}"

    described = {"hhh": part(e.hhh.limit, "items") + f" ({e.hhh.mode} mode)",
                 "truthfulqa": part(e.truthfulqa.limit, "questions") + f" ({e.truthfulqa.mode} mode)",
                 "ranking": part(e.ranking.limit, "dialogues")}
    out = {s: text for s, text in described.items() if s in e.suites}
    out["judge (PPO vs SFT)"] = (part(e.judge.limit, "questions of each set") + f" ({', '.join(e.judge.questions) or 'none'}), "
                                 f"at most {e.judge.sampling.max_new_tokens} new tokens, decision {e.judge.decision}")
    return out
