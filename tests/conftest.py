"""Shared fixtures: tiny random LLaMA models, a local Ray, and the third-party eval data in ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PREPARED_MODELS = ("embedded:smollm2-135m-instruct", "tiny:llama")


def pytest_sessionstart(session):
    """Convert the embedded model and build `tiny:llama` once, before any test, in a process of their own.

    On a fresh machine (an empty `ALMOST_RAY_CACHE`) the first test needing a model would otherwise convert
    it inside the test process: its progress bars would land in that test's captured stderr and its memory
    peak in every later measurement of the process. A warm cache makes this a no-op of about a second.
    """
    done = subprocess.run([sys.executable, "-m", "almost_ray.models.loading", *PREPARED_MODELS],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise pytest.UsageError(f"preparing the test models failed:\n{done.stdout}{done.stderr}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` of a developer checkout; tests that need it skip in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"third-party eval data not found at {SHARED_DATA} (only in the developers' checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_generator():
    """One HF generator on `tiny:llama` (random weights, the embedded model's real tokenizer)."""
    from almost_ray.models.config import ModelConfig
    from almost_ray.models.hf_backend import HFGenerator

    return HFGenerator(ModelConfig(ref="tiny:llama", dtype="float32", max_batch_size=4), device="cpu")


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory) -> Path:
    """tiny:llama with a seeded one-output score head, saved as `train-rm` saves a reward model (so every
    RM replica, PPO's reward actor and critic included, scores alike)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from almost_ray.models.loading import load_tokenizer, resolve_model_dir

    out = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_dir("tiny:llama"), num_labels=1)
    tokenizer = load_tokenizer("tiny:llama")
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """A local 2-CPU Ray shared by the tests of a session."""
    import ray

    from almost_ray.cluster.connect import worker_runtime_env

    if not ray.is_initialized():
        # address="local": a new Ray even when another `ray start` left /tmp/ray/ray_current_cluster;
        # the workers start with the environment `init_ray` gives ours
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env=worker_runtime_env())
    yield ray
    ray.shutdown()


def run_config(tmp_path: Path, **sections):
    """A `Config` whose run folder is `tmp_path/runs/t`, with the given sections (objects or dicts)."""
    from almost_ray.config import Config

    return Config.model_validate({"runs_dir": str(tmp_path / "runs"), "run_name": "t", **sections})


def run_ppo(section, run_dir: Path, prompts: Path | None = None, **hooks) -> Path:
    """The ppo stage with `section` in the run folder `run_dir` (prompts from `prompts` when given); `hooks`
    (`scorer`, `after_iteration`) go to its work, as `rl.stage.work` takes them. Returns `<run_dir>/ppo`."""
    from dataclasses import replace
    from functools import partial

    from almost_ray.config import Config
    from almost_ray.rl import stage

    if prompts is not None:
        section = section.model_copy(update={"prompts": str(prompts)})
    cfg = Config(runs_dir=Path(run_dir).parent, run_name=Path(run_dir).name, ppo=section)
    ppo = replace(stage.STAGE, work=partial(stage.work, **hooks)) if hooks else stage.STAGE
    return ppo.run(cfg)


TINY_SEEDS = ["How do I clean a cast iron pan?", "What is the tallest building in the world?",
              "Can you suggest a name for my new puppy?", "Why do leaves change colour in autumn?",
              "How long should I boil an egg?", "What are some tips for a first marathon?"]


def tiny_pipeline_config(tmp_path: Path, shared: Path | None = None) -> dict:
    """The pipeline at tiny sizes on `tiny:llama` (random weights): every stage in seconds, for tests.

    With `shared` (../shared/data) the eval stages score a few items of the real benchmarks; without, the
    eval stage has no data and says so.
    """
    (tmp_path / "seeds.txt").write_text("\n".join(TINY_SEEDS) + "\n")
    tiny = {"ref": "tiny:llama", "dtype": "float32", "max_batch_size": 4}
    res = {"concurrency": 1, "num_cpus": 1, "batch_size": 4}
    rung = {"model": tiny, "sampling": {"max_new_tokens": 8}, "resources": res}
    role = {"model": tiny, "shots": 1, "sampling": {"max_new_tokens": 6}, "resources": {**res, "num_cpus": 0.3}}
    trainer = {"model": "tiny:llama", "num_workers": 0, "global_batch_size": 4, "micro_batch_size": 4,
               "max_length": 64, "epochs": 1}
    cfg = {
        "run_name": "tiny", "runs_dir": str(tmp_path / "runs"),
        "generate": {"model": tiny, "sampling": {"temperature": 0, "max_new_tokens": 6}, "resources": res},
        "report": {"seed_queries": str(tmp_path / "seeds.txt"), "num_queries": 2},
        "queries": {"seeds": str(tmp_path / "seeds.txt"), "target": 4, "prompts_per_round": 4, "max_rounds": 6,
                    "static_shots": 3, "dynamic_shots": 1, "min_chars": 1, "end_chars": "", "banned_words": [],
                    "rouge_threshold": 0.9, "shard_size": 2, "model": tiny, "sampling": {"max_new_tokens": 16},
                    "resources": res},
        "compare": {
            "shard_size": 4, "trim_to_sentence": False,
            "ladder": [{"name": "hhh-2", "prompt": "hhh", "shots": 2, **rung},
                       {"name": "hhh-1-l1", "prompt": "hhh", "shots": 1, **rung, "model": {**tiny, "num_layers": 1}}],
            "heuristic_filter": {"min_chars": 0, "required_endings": [], "bad_endings": [], "bad_starts": [],
                                 "bad_patterns": [], "length_rule": False},
        },
        "train_rm": {**trainer, "heldout_fraction": 0.3},
        "eval_rm": {"max_length": 64, "resources": res},
        "train_sft": trainer,
        "rmsp": {"best_of": 2, "shard_size": 2, "num_queries": 3, "assistant": role, "user": role,
                 "reward_model": {"max_length": 64, "resources": {**res, "num_cpus": 0.3}}},
        "eval": {"model": tiny, "suites": ["hhh", "truthfulqa"], "resources": res, "shard_size": 8},
    }
    if shared is not None:
        cfg["eval_rm"].update(inputs=[str(shared / "hh_helpful_base_test_500.jsonl")], limit=4)
        cfg["eval"].update(hhh={"data": str(shared / "hhh_alignment.jsonl"), "limit": 3},
                           truthfulqa={"data": str(shared / "truthfulqa_mc.jsonl"), "limit": 3},
                           judge={"questions": {"vicuna": str(shared / "vicuna_questions.jsonl")}, "limit": 2,
                                  "model": tiny, "sampling": {"temperature": 0, "max_new_tokens": 6}})
    return cfg
