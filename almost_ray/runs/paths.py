"""Where every stage of a run reads and writes: `<runs_dir>/<run_name>/<stage folder>/...`, defined once.

Every stage, the pipeline, the CLI, Serve and the OpenRLHF launcher take run paths from here. A stage's
folder is `<run dir>/<STAGE_FOLDERS[stage]>` unless its section sets `output_dir` (the CLI's `--output`);
an input another stage writes is found here unless the reading section names its own (`compare.queries`,
`ppo.policy`, ...; the CLI's `--input` sets those same fields), so the CLI is not a second path system.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from almost_ray.config import Config
from almost_ray.train.config import SFTMode

# stage -> its folder under the run directory (train_sft's is its mode: sft, response_tuning, single_task)
STAGE_FOLDERS = {"queries": "queries", "compare": "compare", "train_rm": "rm", "eval_rm": "eval_rm",
                 "rmsp": "rmsp", "train_dpo": "dpo", "ppo": "ppo", "ppo_grpo": "ppo_grpo", "eval": "eval",
                 "rm_score": "rm_score", "report": "report", "generate": "generate"}
MODEL = "model"  # a training stage's HF directory, inside its folder
RM_HELDOUT = "heldout_comparisons.jsonl"  # train_rm's held-out split, scored by eval_rm
RMSP_PLAIN = "rmsp-plain"  # the plain self-play arm of the comparison below
RMSP_VS_SELF_PLAY = "rmsp-compare"  # RMSP against plain self-play on the same queries (ALMoST Table 5)
PPO_VS_SFT = "ppo-vs-sft"  # the eval stage's pairwise judge of the PPO model against the SFT model


def stage_dir(cfg: Config, stage: str) -> Path:
    """The folder a stage writes (its manifest among its files)."""
    if stage == "generate":  # named by its output file, as `almost-ray generate --output FILE` names it
        return generate_output(cfg).parent
    if stage == "train_sft":
        section = cfg.train_sft
        default = cfg.run_dir / section.mode
    else:
        section = getattr(cfg, stage)
        default = cfg.run_dir / STAGE_FOLDERS[stage]
    return Path(section.output_dir) if section.output_dir is not None else default


def local_model_path(ref: str | Path | None) -> Path | None:
    """A model reference that names a file or folder (not `tiny:`/`embedded:`), as a path; else None."""
    if ref is None or str(ref).startswith(("tiny:", "embedded:")):
        return None
    return Path(ref).expanduser()


# --- what each stage leaves for the next ------------------------------------------------------------------

def queries_file(cfg: Config) -> Path:
    return stage_dir(cfg, "queries") / "queries.jsonl"


def comparisons_file(cfg: Config) -> Path:
    return stage_dir(cfg, "compare") / "comparisons.jsonl"


def rm_model(cfg: Config) -> Path:
    return stage_dir(cfg, "train_rm") / MODEL


def rm_heldout_file(cfg: Config) -> Path | None:
    """The comparisons of held-out queries train_rm writes (None when it holds nothing out)."""
    return stage_dir(cfg, "train_rm") / RM_HELDOUT if cfg.train_rm.heldout_fraction > 0 else None


def rm_accuracy_file(cfg: Config) -> Path:
    return stage_dir(cfg, "eval_rm") / "rm_accuracy.json"


def dialogues_file(cfg: Config) -> Path:
    return stage_dir(cfg, "rmsp") / "dialogues.jsonl"


def rmsp_plain_dir(cfg: Config) -> Path:
    """The plain self-play arm of RMSP vs self-play (the rmsp stage with best_of 1)."""
    return cfg.run_dir / RMSP_PLAIN


def rmsp_vs_self_play_dir(cfg: Config) -> Path:
    return cfg.run_dir / RMSP_VS_SELF_PLAY


def sft_model(cfg: Config) -> Path:
    """The model train_sft writes, in the folder of its mode."""
    return stage_dir(cfg, "train_sft") / MODEL


def dpo_model(cfg: Config) -> Path:
    return stage_dir(cfg, "train_dpo") / MODEL


def ppo_model(cfg: Config) -> Path:
    return stage_dir(cfg, "ppo") / MODEL


def ppo_grpo_model(cfg: Config) -> Path:
    """The policy of the optional ppo_grpo stage (PPO with a critic-free estimator, beside the paper's PPO)."""
    return stage_dir(cfg, "ppo_grpo") / MODEL


def aligned_model_in(run_dir: Path) -> Path | None:
    """The most aligned model a run folder holds when only the folder is known (a Serve deploy file's
    `run_dir`): PPO's policy, else an SFT model of any mode, in the stages' default folders."""
    for folder in (STAGE_FOLDERS["ppo"], *get_args(SFTMode)):
        if (Path(run_dir) / folder / MODEL / "config.json").is_file():
            return Path(run_dir) / folder / MODEL
    return None


def reward_model_in(run_dir: Path) -> Path | None:
    """train_rm's model in a run folder's default layout, when it exists."""
    found = Path(run_dir) / STAGE_FOLDERS["train_rm"] / MODEL
    return found if (found / "config.json").is_file() else None


def eval_summary_file(cfg: Config) -> Path:
    return stage_dir(cfg, "eval") / "summary.json"


def openrlhf_dir(cfg: Config) -> Path:
    """PPO run by OpenRLHF (`--engine openrlhf`): prompts, checkpoints, the policy, TensorBoard logs, job.json."""
    return cfg.run_dir / "ppo_openrlhf"


def rm_score_file(cfg: Config) -> Path:
    """The rm_score stage's report: every model's mean RM score on the same held-out prompts."""
    return stage_dir(cfg, "rm_score") / "rm_score.json"


def report_dir(cfg: Config) -> Path:
    return stage_dir(cfg, "report")


def generate_output(cfg: Config) -> Path:
    return Path(cfg.generate.output or cfg.run_dir / STAGE_FOLDERS["generate"] / "responses.jsonl")


# --- what each stage reads: its section's own setting, else the file the stage before it wrote -------------

def compare_queries(cfg: Config) -> Path | str:
    return cfg.compare.queries or queries_file(cfg)


def train_rm_comparisons(cfg: Config) -> Path | str:
    return cfg.train_rm.comparisons or comparisons_file(cfg)


def eval_rm_model(cfg: Config) -> str:
    return cfg.eval_rm.model or str(rm_model(cfg))


def rmsp_queries(cfg: Config) -> Path | str:
    return cfg.rmsp.queries or queries_file(cfg)


def rm_score_prompts(cfg: Config) -> Path | str | None:
    """The prompts rm_score asks every model: `rm_score.prompts`, else the queries of train_rm's held-out
    comparisons (None: train_rm holds nothing out)."""
    return cfg.rm_score.prompts or rm_heldout_file(cfg)


def rm_score_reward_model(cfg: Config) -> str:
    return cfg.rm_score.reward_model or str(rm_model(cfg))


def rmsp_reward_model(cfg: Config) -> str | None:
    """The RM that picks RMSP's best of N: `rmsp.reward_model.ref`, else train_rm's (None: plain self-play)."""
    if cfg.rmsp.reward_model is None:
        return None
    return cfg.rmsp.reward_model.ref or str(rm_model(cfg))


def train_sft_dialogues(cfg: Config) -> Path | str:
    return cfg.train_sft.dialogues or dialogues_file(cfg)


def train_dpo_comparisons(cfg: Config) -> Path | str:
    return cfg.train_dpo.comparisons or comparisons_file(cfg)


def train_dpo_policy(cfg: Config) -> str:
    """DPO's starting policy (and, unless `train_dpo.reference` says otherwise, its frozen reference)."""
    return cfg.train_dpo.model or str(sft_model(cfg))


def ppo_policy(cfg: Config) -> str:
    return cfg.ppo.policy or str(sft_model(cfg))


def ppo_reward_model(cfg: Config) -> str:
    return cfg.ppo.reward_model or str(rm_model(cfg))


def ppo_prompts(cfg: Config) -> Path | str:
    """PPO's prompts: `ppo.prompts`, else the RMSP dialogues (their first user turns, as in the paper)."""
    return cfg.ppo.prompts or dialogues_file(cfg)
