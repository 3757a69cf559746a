"""The pipeline's stages in order, each a `pipeline.Stage`: where it reads and writes, and which module runs it.

Paths of the run (`<runs_dir>/<run_name>/...`) are defined once here; stage modules are imported only
when their stage runs, so listing the pipeline is instant and a stage that is not built yet (PPO) does
not stop the others.
"""

from __future__ import annotations

from pathlib import Path

from almost_ray.config import Config
from almost_ray.pipeline.loop import Stage

RM_DIR, EVAL_RM_DIR, RMSP_DIR, PPO_DIR = "rm", "eval_rm", "rmsp", "ppo"


def local(ref: str | Path | None) -> Path | None:
    """A model reference that is a file or folder (not `tiny:`/`embedded:`), as a path."""
    if ref is None or str(ref).startswith(("tiny:", "embedded:")):
        return None
    return Path(ref).expanduser()


def queries_file(cfg: Config) -> Path:
    return cfg.run_dir / "queries" / "queries.jsonl"


def comparisons_file(cfg: Config) -> Path:
    return cfg.run_dir / "compare" / "comparisons.jsonl"


def rm_model(cfg: Config) -> Path:
    return cfg.run_dir / RM_DIR / "model"


def heldout_file(cfg: Config) -> Path | None:
    """The comparisons of held-out queries that train_rm writes (None when nothing is held out)."""
    from almost_ray.train.rm import HELDOUT_SPLIT

    return cfg.run_dir / RM_DIR / HELDOUT_SPLIT if cfg.train_rm.heldout_fraction > 0 else None


def dialogues_file(cfg: Config) -> Path:
    return cfg.run_dir / RMSP_DIR / "dialogues.jsonl"


def sft_model(cfg: Config) -> Path:
    return cfg.run_dir / cfg.train_sft.mode / "model"


def ppo_model(cfg: Config) -> Path:
    return cfg.run_dir / PPO_DIR / "model"


def _present(paths: dict[str, Path | None]) -> dict[str, Path]:
    return {k: p for k, p in paths.items() if p is not None}


# --- how each stage calls its module ------------------------------------------------------------------

def _queries(cfg: Config) -> None:
    from almost_ray.synth import queries

    queries.run(cfg.queries, cfg.ray, cfg.run_dir / "queries")


def _compare(cfg: Config) -> None:
    from almost_ray.synth import compare

    compare.run(cfg.compare, cfg.ray, cfg.compare.queries or queries_file(cfg), cfg.run_dir / "compare")


def _train_rm(cfg: Config) -> None:
    from almost_ray.train import rm as reward

    reward.run(cfg.train_rm, cfg.ray, comparisons_file(cfg), cfg.run_dir / RM_DIR)


def eval_rm_files(cfg: Config) -> tuple[list[Path], list[Path]]:
    """(files eval_rm scores, configured files that are missing): the held-out split, then `eval_rm.inputs`."""
    heldout = heldout_file(cfg)
    files = [heldout] if heldout is not None and heldout.is_file() and heldout.stat().st_size else []
    missing = [Path(p) for p in cfg.eval_rm.inputs if not Path(p).is_file()]
    return files + [Path(p) for p in cfg.eval_rm.inputs if Path(p).is_file()], missing


def _eval_rm(cfg: Config) -> None:
    from almost_ray.eval import rm as rm_accuracy

    files, _ = eval_rm_files(cfg)
    if not files:
        from almost_ray.config_base import ConfigError

        raise ConfigError("eval_rm: nothing to score: set train_rm.heldout_fraction > 0 or eval_rm.inputs")
    model = cfg.eval_rm.model or str(rm_model(cfg))
    rm_accuracy.run(model, files, cfg.eval_rm, cfg.ray, cfg.run_dir / EVAL_RM_DIR / "rm_accuracy.json")


def _eval_rm_notes(cfg: Config) -> list[str]:
    files, missing = eval_rm_files(cfg)
    notes = [f"eval_rm.inputs: {p} not found, not scored (third-party data, see docs/evaluation.md)" for p in missing]
    if (heldout := heldout_file(cfg)) is not None and heldout not in files:
        notes.append(f"{heldout}: no held-out pairs to score (the split held out no query)")
    return notes


def _rmsp(cfg: Config) -> None:
    from almost_ray.rmsp import stage

    stage.run(cfg.rmsp, cfg.ray, cfg.run_dir)


def _rmsp_inputs(cfg: Config) -> dict[str, Path]:
    rm = None
    if cfg.rmsp.reward_model is not None:
        rm = local(cfg.rmsp.reward_model.ref) if cfg.rmsp.reward_model.ref else rm_model(cfg)
    return _present({"queries": Path(cfg.rmsp.queries or queries_file(cfg)), "reward_model": rm})


def _train_sft(cfg: Config) -> None:
    from almost_ray.train import sft

    sft.run(cfg.train_sft, cfg.ray, dialogues_file(cfg), cfg.run_dir / cfg.train_sft.mode)


def _ppo(cfg: Config) -> None:
    from almost_ray.rl import stage  # ALMoST step 3; absent until the PPO issue lands (Stage.module)

    stage.run(cfg.ppo, cfg.ray, cfg.run_dir)


def _ppo_inputs(cfg: Config) -> dict[str, Path]:
    p = cfg.ppo
    return _present({
        "policy": local(p.policy) if p.policy else cfg.run_dir / "sft" / "model",
        "reward_model": local(p.reward_model) if p.reward_model else rm_model(cfg),
        "prompts": Path(p.prompts) if p.prompts else dialogues_file(cfg),
    })


def _eval(cfg: Config) -> None:
    from almost_ray.eval import stage

    stage.run(cfg)


def _eval_notes(cfg: Config) -> list[str]:
    from almost_ray.eval import stage

    return stage.notes(cfg)


def _report(cfg: Config) -> None:
    from almost_ray.pipeline import report

    report.run(cfg)


STAGES: list[Stage] = [
    Stage("queries", "Self-Instruct query mining (ALMoST step 1, Appendix C.1)",
          lambda c: c.run_dir / "queries",
          lambda c: _present({"seeds": c.queries.seeds}),
          lambda c: {"queries": queries_file(c)},
          _queries, ("counts.kept", "counts.parsed", "counts.rounds", "counts.dropped_*")),
    Stage("compare", "the generator ladder, Heuristic Filter and As-is RM filter -> synthetic comparisons",
          lambda c: c.run_dir / "compare",
          lambda c: {"queries": Path(c.compare.queries or queries_file(c))},
          lambda c: {"comparisons": comparisons_file(c)},
          _compare, ("counts.queries", "counts.pairs_possible", "counts.pairs_after_heuristic_filter",
                     "counts.comparisons")),
    Stage("train_rm", "the reward model on the comparisons (Ray Train, FSDP)",
          lambda c: c.run_dir / RM_DIR,
          lambda c: {"comparisons": comparisons_file(c)},
          lambda c: _present({"model": rm_model(c), "heldout": heldout_file(c)}),
          _train_rm, ("counts.*", "metrics.steps", "metrics.final_loss", "metrics.tail_accuracy")),
    Stage("eval_rm", "RM accuracy on held-out synthetic comparisons and HH-RLHF, vs prefer-longer",
          lambda c: c.run_dir / EVAL_RM_DIR,
          lambda c: _present({"reward_model": local(c.eval_rm.model) if c.eval_rm.model else rm_model(c),
                              "heldout": heldout_file(c)}),
          lambda c: {"report": c.run_dir / EVAL_RM_DIR / "rm_accuracy.json"},
          _eval_rm, notes=_eval_rm_notes),
    Stage("rmsp", "reward-model-guided self-play -> SFT dialogues (ALMoST step 2)",
          lambda c: c.run_dir / RMSP_DIR, _rmsp_inputs,
          lambda c: {"dialogues": dialogues_file(c)},
          _rmsp, ("counts.queries", "counts.dialogues", "counts.complete_*", "metrics.per_turn.*.mean_chosen_reward")),
    Stage("train_sft", "supervised finetuning on the RMSP dialogues (Ray Train, FSDP)",
          lambda c: c.run_dir / c.train_sft.mode,
          lambda c: {"dialogues": dialogues_file(c)},
          lambda c: {"model": sft_model(c)},
          _train_sft, ("counts.*", "metrics.steps", "metrics.final_loss")),
    Stage("ppo", "PPO against the synthetic RM (ALMoST step 3, RLSF)",
          lambda c: c.run_dir / PPO_DIR, _ppo_inputs,
          lambda c: {"model": ppo_model(c)},
          _ppo, ("counts.*", "metrics.first_reward_mean", "metrics.final_reward_mean", "metrics.final_kl",
                 "metrics.final_policy_loss", "metrics.final_value_loss", "metrics.episodes_per_s",
                 "metrics.role_restarts"),
          module="almost_ray.rl.stage"),
    Stage("eval", "base vs SFT vs PPO on Static HHH and TruthfulQA MC1, PPO vs SFT judge, RMSP vs self-play",
          lambda c: c.run_dir / "eval",
          lambda c: {},
          lambda c: {"summary": c.run_dir / "eval" / "summary.json"},
          _eval, ("metrics.*.value", "metrics.*.win"), notes=_eval_notes),
    Stage("report", "report.md, report.json and plots; the same queries answered by base, SFT and PPO",
          lambda c: c.run_dir / "report",
          lambda c: {},
          lambda c: {"markdown": c.run_dir / "report" / "report.md", "json": c.run_dir / "report" / "report.json"},
          _report, ("counts.*",)),
]
