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


# --- the GPU path --------------------------------------------------------------------------------


def _llm_serving_args_fields() -> set[str]:
    """Field names of `LLMServingArgs` in the installed Ray (its module imports vLLM, so read its source)."""
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    tree = ast.parse((ray_dir / "llm/_internal/serve/core/ingress/builder.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "LLMServingArgs")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_gpu_deploy_config_validates_with_ray_schemas(tmp_path):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    from almost_ray.serve.llm import CHAT_TEMPLATES, gpu_deploy_config

    model = tmp_path / "ppo" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model.parent / "manifest.json").write_text(json.dumps({"config": {"prompt_format": "human_assistant"}}))
    cfg = ServeConfig.model_validate({
        "run_dir": str(tmp_path),
        "chat": {"rules": {"enabled": True}, "deployment": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}},
        "llm": {"tensor_parallel_size": 2, "accelerator_type": "A100", "engine_kwargs": {"max_model_len": 2048}},
    })
    deploy = gpu_deploy_config(cfg)
    ServeDeploySchema.model_validate(deploy)
    llm_app, rm_app = deploy["applications"]
    assert llm_app["import_path"] == "ray.serve.llm:build_openai_app"
    assert set(llm_app["args"]) <= _llm_serving_args_fields()
    (entry,) = llm_app["args"]["llm_configs"]
    parsed = LLMConfig.model_validate(entry)  # extra="forbid": every field name is one Ray knows
    assert parsed.model_loading_config.model_source == str(model.resolve())
    assert parsed.engine_kwargs["tensor_parallel_size"] == 2
    assert parsed.engine_kwargs["chat_template"] == CHAT_TEMPLATES["human_assistant"]
    assert parsed.engine_kwargs["logits_processors"] == ["almost_ray.adapters.rules_vllm:RulesAdapterProcessor"]
    assert parsed.deployment_config["autoscaling_config"]["max_replicas"] == 4
    assert rm_app["import_path"] == "almost_ray.serve.app:build_app" and rm_app["route_prefix"] == "/rm"
    rm_cfg = ServeConfig.model_validate(rm_app["args"])
    assert not rm_cfg.chat.enabled and rm_cfg.run_dir == tmp_path.resolve()
    with pytest.raises(ValueError, match="CPU-only"):
        gpu_deploy_config(ServeConfig(run_dir=tmp_path / "nothing"))


@pytest.mark.parametrize("fmt", ["human_assistant", "tulu"])
def test_gpu_chat_templates_render_what_the_model_was_trained_on(fmt):
    from almost_ray.models.loading import load_tokenizer
    from almost_ray.serve.llm import CHAT_TEMPLATES
    from almost_ray.templates import render_prompt

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


def test_cli_writes_the_gpu_deploy_file(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from almost_ray.cli import main

    model = tmp_path / "run" / "sft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = tmp_path / "gpu.yaml"
    assert main(["serve", "--set", f"runs_dir={tmp_path}", "--set", "run_name=run",
                 "--write-gpu-config", str(out)]) == 0
    deploy = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(deploy)
    assert deploy["applications"][0]["args"]["llm_configs"][0]["model_loading_config"]["model_source"] == str(
        model.resolve())
