"""One home for each piece of shared code: the tokenizer loader, `Messages`, stop strings, atomic folder
replacement, the replica class, the learning-rate schedule, the metrics log; each config section beside its
stage, prompt text with the prompts."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

import almost_ray

PACKAGE = Path(almost_ray.__file__).parent
ROOT = PACKAGE.parent
# The loader itself, and the conversions beside it (a GGUF's tokenizer, a layer-truncated copy for vLLM).
CONVERSIONS = {"models/loading.py"}


def sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path.read_text(encoding="utf-8")


def test_one_tokenizer_loader_with_padding_and_truncation_sides():
    from almost_ray.models.loading import load_tokenizer, resolve_model_dir
    from almost_ray.train import rm as reward
    from almost_ray.train import sft

    loaders = [name for name, text in sources()
               if "AutoTokenizer.from_pretrained" in text and name not in CONVERSIONS]
    assert loaders == []
    tok = load_tokenizer("tiny:llama", padding_side="right", truncation_side="left")
    assert (tok.padding_side, tok.truncation_side) == ("right", "left") and tok.pad_token is not None
    rm_tok = reward.load_tokenizer(resolve_model_dir("tiny:llama"))
    assert (rm_tok.padding_side, rm_tok.truncation_side) == ("right", "left")  # as RewardModel scores
    assert sft.load_tokenizer("tiny:llama").padding_side == "right"


def test_messages_defined_once():
    definitions = [name for name, text in sources() if re.search(r"^Messages\s*=", text, re.M)]
    assert definitions == ["data/records.py"]


def test_stop_strings_defined_once():
    from almost_ray.prompts.templates import STOP_STRINGS, default_stop
    from almost_ray.rmsp.turns import role_stop

    assert role_stop("assistant") == default_stop("human_assistant") == STOP_STRINGS["human_assistant"]["assistant"]
    assert role_stop("user") == default_stop("human_assistant", "user")
    assert role_stop("user", ["\n\n"]) == [*default_stop("human_assistant", "user"), "\n\n"]
    lists = [name for name, text in sources() if re.search(r'\[STOP_HUMAN|"\\nHuman:"\]', text)]
    assert lists == ["prompts/templates.py"]


def definitions(kind: type, name: str) -> list[str]:
    """Files defining a top-level function or class `name`."""
    found = []
    for rel, text in sources():
        for node in ast.parse(text).body:
            if isinstance(node, kind) and node.name == name:
                found.append(rel)
    return found


def test_schedule_metrics_log_and_replicas_are_defined_once():
    assert definitions(ast.FunctionDef, "cosine_with_warmup") == ["train/optim.py"]
    assert definitions(ast.ClassDef, "MetricsLog") == ["data/metrics_log.py"]
    # the only classes that answer a pandas batch: the one replica class and the memory-reporting wrapper,
    # and the dry-placement stand-in that loads nothing (`almost-ray plan`'s simulated cluster)
    answering = sorted({rel for rel, text in sources() for node in ast.walk(ast.parse(text))
                        if isinstance(node, ast.ClassDef)
                        for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "__call__"
                        and [a.arg for a in item.args.args[:2]] == ["self", "batch"]})
    assert answering == ["cluster/replicas.py", "plan/dry_run.py"]


def test_folders_are_replaced_and_removed_in_one_place():
    """`shutil.rmtree` and renames of folders live in `data/atomic.py` (which refuses what it did not write);
    the model cache keeps a concurrent converter's identical copy, through the same code."""
    calls = [f"{rel}:{node.lineno}" for rel, text in sources() if rel != "data/atomic.py"
             for node in ast.walk(ast.parse(text))
             if isinstance(node, ast.Call) and ast.unparse(node.func) in ("shutil.rmtree", "os.rename")]
    assert calls == []


# --- config modules ------------------------------------------------------------------------------------------

def config_modules() -> list[str]:
    """Every module that defines settings: `config_base.py`, `config.py`, `<area>/config.py`, `<stage>_config.py`."""
    paths = [p for p in PACKAGE.rglob("*.py") if p.name == "config.py" or p.name.endswith("_config.py")]
    paths.append(PACKAGE / "config_base.py")
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in paths)


def test_config_py_holds_only_the_run_config():
    tree = ast.parse((PACKAGE / "config.py").read_text(encoding="utf-8"))
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    constants = [target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(target, ast.Name)]
    public = [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]
    assert classes == ["Config"]
    assert constants == ["__all__"]  # no prompt text, no Table 8 rows
    assert sorted(public) == ["load_config"]


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_every_section_is_defined_in_a_config_module_of_its_area():
    from almost_ray.config import Config

    homes = set(config_modules())
    seen: dict[str, str] = {}
    todo = [Config]
    while todo:
        model = todo.pop()
        if model.__name__ in seen:
            continue
        seen[model.__name__] = model.__module__
        for field in model.model_fields.values():
            todo += _models_in(field.annotation)
    assert {name for name, module in seen.items() if module not in homes} == set()
    expected = {
        "Config": "almost_ray.config", "RayConfig": "almost_ray.cluster.config",
        "ResourcesConfig": "almost_ray.cluster.config", "ModelConfig": "almost_ray.models.config",
        "SamplingParams": "almost_ray.models.config", "RulesConfig": "almost_ray.adapters.config",
        "TokenBias": "almost_ray.adapters.config", "GenerateConfig": "almost_ray.generate.config",
        "ReportConfig": "almost_ray.pipeline.config", "QueriesConfig": "almost_ray.synth.config",
        "CompareConfig": "almost_ray.synth.config", "HeuristicFilterConfig": "almost_ray.synth.config",
        "TrainRMConfig": "almost_ray.train.config", "TrainSFTConfig": "almost_ray.train.config",
        "EvalConfig": "almost_ray.eval.config", "EvalRMConfig": "almost_ray.eval.config",
        "RMSPConfig": "almost_ray.rmsp.config", "PPOConfig": "almost_ray.rl.config",
        "ServeConfig": "almost_ray.serve.config", "PipelineConfig": "almost_ray.pipeline.config",
        "PPOGRPOConfig": "almost_ray.rl.config", "RMScoreConfig": "almost_ray.eval.config",
        "TrainDPOConfig": "almost_ray.train.config",
    }
    assert {name: seen[name] for name in expected} == expected


def test_prompt_text_lives_with_the_prompts_and_table8_beside_the_rules_adapter():
    from almost_ray.adapters import config as rules_config
    from almost_ray.eval import templates as prompts

    for name in ("HHH_LETTER_TEMPLATE", "ANSWER_TEMPLATE", "TRUE_FALSE_TEMPLATE", "JUDGE_TEMPLATE"):
        assert "\n\nAssistant:" in getattr(prompts, name)
    assert (rules_config.WHAT_WEIGHT_LISTING1, rules_config.WHAT_WEIGHT_TABLE8) == (-5.0, -3.0)
    assert rules_config.RulesConfig().biases[3].strings == ["What"]
    for module in config_modules():
        path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        texts = [node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        assert not [s for s in texts if "\n\nHuman:" in s or "\n\nAssistant:" in s], module


def test_config_modules_import_neither_torch_nor_ray():
    """Loading a config must stay cheap and cycle-free: settings import pydantic and each other only."""
    code = (
        "import importlib, sys\n"
        f"for name in {config_modules()!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'vllm', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_moved_names_are_imported_from_their_homes():
    """No re-export shims: `almost_ray.config` gives `Config` and `load_config`, nothing else."""
    wrong = []
    for folder in ("almost_ray", "tests", "bench", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module == "almost_ray.config":
                    names = {alias.name for alias in node.names} - {"Config", "load_config"}
                    wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in sorted(names)]
    assert wrong == []
