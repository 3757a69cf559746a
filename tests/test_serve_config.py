"""Serve without a server: the deploy files against Ray's own schemas, the GPU config against
`ray.serve.llm`'s `LLMConfig`, and the pure parts of the request checks and completion reading."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from almost_ray.serve.config import DeploymentOptions, RequestLimits, ServeConfig
from almost_ray.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    check_chat,
    json_depth,
    param_of,
    parse_json_body,
    validate_model,
)

ROOT = Path(__file__).resolve().parents[1]
LIMITS = RequestLimits()


def test_serve_config_yaml_validates_with_ray_and_our_schema():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = data["applications"]
    assert app["import_path"] == "almost_ray.serve.app:build_app"
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.reward.deployment.serve_options()["autoscaling_config"]["max_replicas"] == 2


def test_import_paths_resolve():
    from ray.serve import Application

    from almost_ray.serve import app  # `serve run almost_ray.serve.app:app`; `import_path: ...:build_app`

    assert isinstance(app.app, Application) and isinstance(app.build_app({}), Application)


def test_deployment_options():
    opts = DeploymentOptions(num_replicas=2, num_gpus=1).serve_options()
    assert opts == {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}, "num_replicas": 2}
    auto = DeploymentOptions(autoscaling_config={"min_replicas": 1, "max_replicas": 3}).serve_options()
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ValueError, match="not both"):
        DeploymentOptions(num_replicas=2, autoscaling_config={"min_replicas": 1})
    with pytest.raises(ValueError, match="default_max_tokens"):
        RequestLimits(max_tokens=8, default_max_tokens=16)


def test_project_config_has_a_serve_section_and_cli_rejects_bad_values(capsys):
    from almost_ray.cli import main
    from almost_ray.config import load_config

    assert load_config(None, ["serve.chat.rules.enabled=true"]).serve.chat.rules_config().enabled
    assert main(["serve", "--set", "serve.limits.max_n=0"]) == 2
    assert "serve.limits.max_n" in capsys.readouterr().err
    assert main(["serve", "--set", "serve.chat.rules.eos_weight=lots"]) == 2


def test_build_app_names_bad_args():
    from almost_ray.config_base import ConfigError
    from almost_ray.serve.app import build_app

    with pytest.raises(ConfigError, match="serve args: limits.max_tokens"):
        build_app({"limits": {"max_tokens": 0}})


def test_aligned_model_and_its_prompt_format_are_found(tmp_path):
    from almost_ray.serve.chat import EMBEDDED, model_id_of, resolve_chat_model, trained_prompt_format

    cfg = ServeConfig(run_dir=tmp_path)
    assert resolve_chat_model(cfg) == EMBEDDED
    sft = tmp_path / "sft" / "model"
    sft.mkdir(parents=True)
    (sft / "config.json").write_text("{}")
    assert resolve_chat_model(cfg) == str(sft.resolve())
    assert trained_prompt_format(str(sft)) is None
    (sft.parent / "manifest.json").write_text(json.dumps({"config": {"prompt_format": "tulu"}}))
    assert trained_prompt_format(str(sft)) == "tulu"
    ppo = tmp_path / "ppo" / "model"
    ppo.mkdir(parents=True)
    (ppo / "config.json").write_text("{}")
    assert resolve_chat_model(cfg) == str(ppo.resolve())
    assert model_id_of(str(ppo.resolve())) == f"{tmp_path.name}/ppo"
    assert model_id_of("tiny:llama") == "tiny:llama"


# --- the GPU path: everything but vLLM itself, built and checked here ---------------------------------


RAY_DIR = Path(importlib.util.find_spec("ray").origin).parent


def _ray_module_names(module: str) -> set[str]:
    """Top-level names a module of the installed Ray defines, read from its source (`ray.serve.llm` and its
    submodules import vLLM, which is not installed here)."""
    rel = Path(*module.split(".")[1:])
    path = RAY_DIR / rel / "__init__.py" if (RAY_DIR / rel).is_dir() else RAY_DIR / rel.with_suffix(".py")
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def _class_methods(tree: ast.AST, name: str) -> dict[str, list[str]]:
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
    return {f.name: [a.arg for a in f.args.args + f.args.kwonlyargs] for f in cls.body
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_gpu_app_uses_what_the_installed_ray_defines():
    """`llm_app.py` (which needs vLLM to import) against the installed Ray's source: every name it imports
    from Ray exists, every route it adds is a method of its ingress, and the methods it overrides keep
    the parameters Ray's ingress routes with."""
    source = (Path(__file__).resolve().parents[1] / "almost_ray/serve/llm_app.py").read_text()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module.startswith("ray."):
            missing = {a.name for a in node.names} - _ray_module_names(node.module)
            assert not missing, (node.module, missing)
    ours = _class_methods(tree, "LLMIngress")
    ray_ingress = _class_methods(ast.parse((RAY_DIR / "llm/_internal/serve/core/ingress/ingress.py").read_text()),
                                 "OpenAiIngress")
    endpoints = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "ENDPOINTS")
    added = {k.value for k in endpoints.value.keys if k is not None}
    assert added == {"reward_scores", "health"} and added <= set(ours)
    for name in ("chat", "completions", "models"):
        assert ours[name] == ray_ingress[name], name
    assert ours["__init__"][:3] == ray_ingress["__init__"][:3]


def _model_dir(root: Path, positions: int = 2048, fmt: str | None = "human_assistant") -> Path:
    model = root / "ppo" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": positions}))
    if fmt:
        (model.parent / "manifest.json").write_text(json.dumps({"config": {"prompt_format": fmt}}))
    return model


def test_llm_config_validates_with_ray_and_takes_the_models_context(tmp_path):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    from almost_ray.config_base import ConfigError
    from almost_ray.serve.llm import CHAT_TEMPLATES, llm_config

    model = _model_dir(tmp_path)
    cfg = ServeConfig.model_validate({
        "run_dir": str(tmp_path),
        "chat": {"backend": "vllm", "deployment": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}},
        "llm": {"tensor_parallel_size": 2, "accelerator_type": "A100"},
    })
    parsed = LLMConfig.model_validate(llm_config(cfg, str(model)))  # extra="forbid": every field is one Ray knows
    assert parsed.model_loading_config.model_source == str(model)
    assert parsed.engine_kwargs["max_model_len"] == 2048  # LLaMA-1's positions, from its config.json
    assert parsed.engine_kwargs["tensor_parallel_size"] == 2
    assert parsed.engine_kwargs["chat_template"] == CHAT_TEMPLATES["human_assistant"]
    assert parsed.engine_kwargs["logits_processors"] == ["almost_ray.adapters.rules_vllm:RulesAdapterProcessor"]
    assert parsed.deployment_config["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in parsed.deployment_config and "ray_actor_options" not in parsed.deployment_config
    smaller = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"engine_kwargs": {"max_model_len": 1024}})})
    assert llm_config(smaller, str(model))["engine_kwargs"]["max_model_len"] == 1024
    larger = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"engine_kwargs": {"max_model_len": 4096}})})
    with pytest.raises(ConfigError, match="serve.llm.engine_kwargs.max_model_len: 4096 exceeds .* 2048"):
        llm_config(larger, str(model))
    # a hub id or a path only the cluster has: vLLM reads the context itself
    assert "max_model_len" not in llm_config(cfg, "/mnt/shared/elsewhere/model")["engine_kwargs"]
    with pytest.raises(ConfigError, match="CPU-only"):
        llm_config(cfg, "tiny:llama")


def test_build_app_with_the_vllm_backend_needs_vllm(tmp_path):
    from almost_ray.config_base import ConfigError
    from almost_ray.serve.app import build_app

    _model_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"serve.chat.backend: vllm needs vLLM .*(vLLM|vllm)"):
        build_app({"run_dir": str(tmp_path), "chat": {"backend": "vllm"}})


def test_rules_switch_becomes_the_adapters_vllm_argument():
    from almost_ray.adapters.rules import RULES_EXTRA_ARG, rules_from_extra_arg
    from almost_ray.serve.llm import rules_xargs

    rules = {"enabled": False, "eos_weight": 3.0}
    extra = {"rules_adapter": True, "other": 1}
    xargs = rules_xargs(extra, None, False, rules)
    assert extra == {"other": 1}  # popped: vLLM does not see an unknown field
    parsed = rules_from_extra_arg(xargs[RULES_EXTRA_ARG])
    assert parsed.enabled and parsed.eos_weight == 3.0
    assert rules_xargs({}, {"a": 1}, True, rules)[RULES_EXTRA_ARG]  # the deployment's default
    assert rules_xargs({"rules_adapter": False}, None, True, rules) is None  # a request turns it off
    assert rules_xargs({}, {RULES_EXTRA_ARG: "{}"}, True, rules) == {RULES_EXTRA_ARG: "{}"}  # the client's own


def test_rayservice_serves_through_ray_serve_llm():
    """k8s/rayservice.yaml: the chat model on vLLM beside the RM, bound for the pod network, paths left to
    the cluster, replica counts left to the autoscaler that the cluster turns on."""
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())
    deploy = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(deploy)
    assert deploy["http_options"]["host"] == "0.0.0.0"
    (app,) = deploy["applications"]
    assert app["import_path"] == "almost_ray.serve.app:build_app" and app["route_prefix"] == "/"
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.chat.backend == "vllm"
    assert str(cfg.chat.model).startswith("/mnt/shared/") and str(cfg.reward.model).startswith("/mnt/shared/")
    assert "max_model_len" not in cfg.llm.engine_kwargs or cfg.llm.engine_kwargs["max_model_len"] <= 2048
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    for options in (cfg.chat.deployment, cfg.reward.deployment, cfg.ingress):
        assert options.autoscaling_config is not None and options.num_replicas is None


@pytest.mark.parametrize("fmt", ["human_assistant", "tulu"])
def test_gpu_chat_templates_render_what_the_model_was_trained_on(fmt):
    from almost_ray.models.loading import load_tokenizer
    from almost_ray.prompts.templates import render_prompt
    from almost_ray.serve.llm import CHAT_TEMPLATES

    tok = load_tokenizer("tiny:llama")
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " Hi there \n"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}]
    rendered = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATES[fmt], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == render_prompt(fmt, messages)


def test_rules_arrive_as_json_text_through_vllm_xargs():
    from almost_ray.adapters.rules import rules_from_extra_arg

    assert rules_from_extra_arg('{"enabled": true, "eos_weight": 3}').eos_weight == 3
    assert rules_from_extra_arg({"enabled": True}).enabled
    with pytest.raises(ValueError):
        rules_from_extra_arg('{"enabled": true, "nope": 1}')


# --- request checks ------------------------------------------------------------------------------


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(b'"\\"[["') == 0
    with pytest.raises(APIError) as err:
        parse_json_body(b"[" * 100_000 + b"]" * 100_000, LIMITS)  # would exhaust the parser's recursion
    assert err.value.status == 400 and err.value.code == "invalid_json"
    with pytest.raises(APIError) as err:
        parse_json_body(b" " * (LIMITS.max_body_bytes + 1), LIMITS)
    assert err.value.status == 413
    with pytest.raises(APIError, match="Infinity"):
        parse_json_body(b'{"temperature": Infinity}', LIMITS)


def test_param_names_follow_the_request():
    assert param_of(("messages", 0, "role")) == "messages[0].role"
    assert param_of(("stop", "list[str]", 1)) == "stop[1]"
    assert param_of(("messages", 2, "content", "str")) == "messages[2].content"
    with pytest.raises(APIError) as err:
        validate_model(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "n": 1.5})
    assert err.value.param == "n"


def _job(**fields):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return check_chat(validate_model(ChatCompletionRequest, body), LIMITS)


def test_chat_bounds_and_defaults():
    job = _job(stop="\n")
    assert job.max_tokens == LIMITS.default_max_tokens and job.sampling.stop == ("\n",) and job.sampling.rules is None
    assert _job(max_completion_tokens=7).max_tokens == 7
    assert _job(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
                ).messages == [{"role": "user", "content": "ab"}]
    for fields, param in [({"max_tokens": 513}, "max_tokens"), ({"max_tokens": 5, "max_completion_tokens": 6},
                          "max_completion_tokens"), ({"top_p": 0.0}, "top_p"), ({"temperature": -0.1}, "temperature"),
                          ({"n": 5}, "n"), ({"stop": ["a"] * 5}, "stop"), ({"stream_options": {"include_usage": True}},
                          "stream_options")]:
        with pytest.raises(APIError) as err:
            _job(**fields)
        assert err.value.param == param and err.value.status == 400


def test_read_completion_counts_tokens_and_finish_reason():
    from almost_ray.serve.chat import read_completion

    def decode(ids):
        return "".join(chr(96 + i) for i in ids)  # 1 -> "a", 2 -> "b", ...

    eos, pad = {0}, 0
    assert read_completion([1, 2, 0, 0], 4, (), eos, pad, decode).__dict__ == {
        "text": "ab", "finish_reason": "stop", "completion_tokens": 3, "logprobs": None}
    assert read_completion([1, 2, 3, 4], 4, (), eos, pad, decode).finish_reason == "length"
    # a row generated past its own max_tokens (another request in the batch wanted more) is cut
    cut = read_completion([1, 2, 3, 4, 5, 6], 3, (), eos, pad, decode)
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("abc", "length", 3)
    # a stop string ended the row inside the batch; the padding after it is not a generated EOS
    stopped = read_completion([1, 2, 3, 0, 0], 5, ("c",), eos, pad, decode)
    assert (stopped.text, stopped.finish_reason, stopped.completion_tokens) == ("ab", "stop", 3)
    # a stop string in the last generated token
    last = read_completion([1, 2, 3], 3, ("c",), eos, pad, decode)
    assert (last.text, last.finish_reason) == ("ab", "stop")


def test_cli_writes_the_gpu_deploy_file(tmp_path, monkeypatch):
    """`--write-gpu-config`: a cluster file (proxy on 0.0.0.0, `chat.backend: vllm`), paths as written (the
    cluster resolves them), `max_model_len` from the model's config.json."""
    from ray.serve.schema import ServeDeploySchema

    from almost_ray.cli import main

    monkeypatch.chdir(tmp_path)
    _model_dir(Path("run"))
    out = tmp_path / "gpu.yaml"
    assert main(["serve", "--set", "runs_dir=.", "--set", "run_name=run", "--set", "serve.chat.model=run/ppo/model",
                 "--write-gpu-config", str(out)]) == 0
    deploy = yaml.safe_load(out.read_text())
    assert ServeDeploySchema.model_validate(deploy).http_options.host == "0.0.0.0"  # Ray's default: the pod's interfaces
    (app,) = deploy["applications"]
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.chat.backend == "vllm" and cfg.chat.model == "run/ppo/model" and str(cfg.run_dir) == "run"
    assert cfg.llm.engine_kwargs["max_model_len"] == 2048
    assert cfg.http.host == "127.0.0.1"  # `almost-ray serve` on a machine still binds loopback


def test_a_completion_keeps_the_space_a_sentencepiece_decoder_drops():
    from almost_ray.serve.chat import decode_after

    vocab = {1: "\u2581The", 2: "\u2581capital", 3: "\u2581is", 4: "\u2581Paris"}

    def decode(ids):  # SentencePiece: "\u2581" is a space, and a sequence's leading space is dropped
        return "".join(vocab[i] for i in ids).replace("\u2581", " ").removeprefix(" ")

    assert decode([4]) == "Paris"
    assert decode_after(decode, [1, 2, 3], [4]) == " Paris"
    assert decode([1, 2, 3]) + decode_after(decode, [1, 2, 3], [4]) == "The capital is Paris"
