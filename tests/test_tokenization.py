"""One tokenization and one prompt-length policy for every backend .

The tokenizer here HAS a BOS that it adds by default (`add_bos_token=True`), like LLaMA's: the HF path,
the training path (SFT encoding, RM encoding) and the ids handed to vLLM must agree token for token,
without it. vLLM itself cannot run here: only the `vllm` module is replaced (an engine that records
what it is given); `VLLMGenerator` runs as it is.
"""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pandas as pd
import pytest
from transformers import LogitsProcessor

from almost_ray.data.records import RecordError
from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.loading import load_tokenizer, resolve_model_dir
from almost_ray.models.text import OverlongPromptError, drop_last_shot, fit_prompt, prompt_token_ids
from almost_ray.prompts.templates import fewshot_header, human_assistant, load_prompt_text, tulu
from almost_ray.train.config import TrainSFTConfig

GREEDY = SamplingParams(temperature=0, max_new_tokens=4)


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    """tiny:llama's weights with a tokenizer that adds `<|im_start|>` as BOS, as LLaMA's adds `<s>`."""
    from transformers import AutoTokenizer

    src = resolve_model_dir("tiny:llama")
    out = tmp_path_factory.mktemp("bos-llama") / "model"
    shutil.copytree(src, out)
    tok = AutoTokenizer.from_pretrained(src, bos_token="<|im_start|>", add_bos_token=True)
    tok.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("hi").input_ids[0] == reloaded.bos_token_id  # the fixture really adds a BOS
    return out


class FirstInputs(LogitsProcessor):
    """Records the ids the model is given (the first decoding step sees exactly the prompt)."""

    def __init__(self):
        self.seen: list[list[int]] = []

    def __call__(self, input_ids, scores):
        if not self.seen:
            self.seen = input_ids.tolist()
        return scores


def hf_prompt_ids(gen, prompts: list[str], params: SamplingParams = GREEDY) -> list[list[int]]:
    probe = FirstInputs()
    gen.generate(prompts, params, logits_processors=[probe])
    pad = gen.tokenizer.pad_token_id
    return [[t for t in row if t != pad] for row in probe.seen]  # left padding removed


def fake_vllm(monkeypatch, tokenizer, max_model_len: int):
    """Install a `vllm` module whose engine records its inputs; returns the list they are recorded in."""
    calls: list = []

    class LLM:
        def __init__(self, **kwargs):
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=max_model_len))

        def get_tokenizer(self):
            return tokenizer

        def generate(self, prompts, sampling, use_tqdm=True):
            calls.append(prompts)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=" ok")] * s.n)
                    for s in sampling]

    class VSamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, VSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)  # vLLM's TokensPrompt is a TypedDict
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return calls


@pytest.fixture(scope="module")
def bos_generator(bos_model_dir):
    from almost_ray.models.hf_backend import HFGenerator

    return HFGenerator(ModelConfig(ref=str(bos_model_dir), backend="hf", dtype="float32"), device="cpu")


def test_hf_training_and_vllm_ids_agree_token_for_token(bos_model_dir, bos_generator, monkeypatch):
    from almost_ray.data.preferences import PreferencePair
    from almost_ray.models.reward import rm_text
    from almost_ray.models.vllm_backend import VLLMGenerator
    from almost_ray.train import rm as reward
    from almost_ray.train import sft

    tok = load_tokenizer(bos_model_dir)
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]
    prompts = [tulu(messages[:1]), human_assistant(messages[:1])]
    expected = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    assert all(ids[0] != tok.bos_token_id for ids in expected)

    assert hf_prompt_ids(bos_generator, prompts[:1]) == expected[:1]
    assert hf_prompt_ids(bos_generator, prompts[1:]) == expected[1:]

    calls = fake_vllm(monkeypatch, tok, max_model_len=1024)
    vllm_gen = VLLMGenerator(ModelConfig(ref=str(bos_model_dir), backend="vllm"))
    assert vllm_gen.generate(prompts, GREEDY) == [["ok"], ["ok"]]
    assert calls[0] == [{"prompt_token_ids": ids} for ids in expected]

    # SFT (tulu, as response tuning trains) and the RM see the generation prompt as a prefix, no BOS
    cfg = TrainSFTConfig(prompt_format="tulu", max_length=256)
    sft_ids = sft.encode_conversations([messages], sft.load_tokenizer(bos_model_dir), cfg)[0]["input_ids"].tolist()
    assert sft_ids[: len(expected[0])] == expected[0]
    pair = PreferencePair(chosen=messages, rejected=[messages[0], {"role": "assistant", "content": "A rock."}])
    rm_ids = reward.encode_pairs([pair], reward.load_tokenizer(bos_model_dir), 256)[0]["chosen"].tolist()
    assert rm_ids == prompt_token_ids(tok, rm_text(messages))
    assert rm_ids[: len(expected[1])] == expected[1]


def fewshot_prompt(shots: int) -> tuple[str, str]:
    header = fewshot_header(load_prompt_text("faithful"), shots)
    return header, human_assistant([{"role": "user", "content": "What is a good name for a cat?"}], header)


def test_fit_prompt_drops_shots_last_first_then_errors_or_skips(bos_model_dir):
    tok = load_tokenizer(bos_model_dir)
    encode = lambda text: prompt_token_ids(tok, text)  # noqa: E731
    _, three = fewshot_prompt(3)
    by_shots = {k: encode(fewshot_prompt(k)[1]) for k in range(4)}
    assert drop_last_shot(three) == fewshot_prompt(2)[1]
    assert drop_last_shot(human_assistant([{"role": "user", "content": "q"}])) is None

    assert fit_prompt(three, encode, len(by_shots[3])).ids == by_shots[3]  # fits as it is
    fitted = fit_prompt(three, encode, len(by_shots[1]))  # exactly one shot fits
    assert (fitted.ids, fitted.shots_dropped) == (by_shots[1], 2)
    fitted = fit_prompt(three, encode, len(by_shots[0]))
    assert (fitted.ids, fitted.shots_dropped) == (by_shots[0], 3)
    with pytest.raises(OverlongPromptError, match=r"record 7: .*after dropping 3 few-shot") as err:
        fit_prompt(three, encode, len(by_shots[0]) - 1, where="record 7")
    assert isinstance(err.value, RecordError)  # the CLI exits 2 on it
    skipped = fit_prompt(three, encode, len(by_shots[0]) - 1, on_overlong="skip")
    assert skipped.skipped and skipped.shots_dropped == 3


def test_both_backends_apply_the_same_length_policy(bos_model_dir, monkeypatch):
    """HF used to left-truncate (cutting the instruction); vLLM refused the prompt and failed the batch."""
    from almost_ray.models.hf_backend import HFGenerator
    from almost_ray.models.vllm_backend import VLLMGenerator

    tok = load_tokenizer(bos_model_dir)
    prompts = [fewshot_prompt(3)[1], "Short prompt."]
    one_shot = prompt_token_ids(tok, fewshot_prompt(1)[1])
    positions = len(one_shot) + GREEDY.max_new_tokens  # room for one shot and the new tokens

    hf = HFGenerator(ModelConfig(ref=str(bos_model_dir), backend="hf", dtype="float32"), device="cpu")
    hf.max_positions = positions  # a model with a short context
    assert hf_prompt_ids(hf, prompts[:1]) == [one_shot]
    assert [(f.shots_dropped, f.skipped) for f in hf.last_fits] == [(2, False)]

    calls = fake_vllm(monkeypatch, tok, max_model_len=positions)
    vllm_gen = VLLMGenerator(ModelConfig(ref=str(bos_model_dir), backend="vllm"))
    vllm_gen.generate(prompts, GREEDY)
    assert calls[0][0] == {"prompt_token_ids": one_shot}
    assert [f.shots_dropped for f in vllm_gen.last_fits] == [f.shots_dropped for f in hf.fit_prompts(prompts, GREEDY)]

    too_short = GREEDY.model_copy(update={"max_new_tokens": positions - 3})
    with pytest.raises(OverlongPromptError, match="prompt 0"):
        hf.generate(prompts, too_short)
    with pytest.raises(OverlongPromptError, match="prompt 0"):
        vllm_gen.generate(prompts, too_short)
    vllm_gen.config = vllm_gen.config.model_copy(update={"on_overlong": "skip"})
    out = vllm_gen.generate(prompts, too_short)
    assert out == [[], ["ok"]] and [f.skipped for f in vllm_gen.last_fits] == [True, False]
    assert len(calls[-1]) == 1  # the skipped prompt never reached the engine


def test_generation_replica_reports_the_policy_per_row(bos_model_dir):
    from almost_ray.cluster.replicas import ModelReplica
    from almost_ray.generate.pool import generation_replica

    header, _ = fewshot_prompt(3)
    model = ModelConfig(ref=str(bos_model_dir), backend="hf", dtype="float32", on_overlong="skip")
    replica = ModelReplica(**generation_replica(model, GREEDY, "human_assistant", header))
    replica.model.max_positions = len(prompt_token_ids(replica.model.tokenizer, fewshot_prompt(2)[1])) + 4
    batch = pd.DataFrame({"messages": ['[{"role": "user", "content": "What is a good name for a cat?"}]',
                                       '[{"role": "user", "content": "' + "very long " * 400 + '"}]']})
    out = replica(batch)
    assert out["shots_dropped"].tolist() == [1, 3] and out["prompt_skipped"].tolist() == [False, True]
    assert out["responses"][1] == "[]"


def test_scoring_uses_the_generator_method_not_its_model(tiny_generator):
    """eval/scoring.py no longer reaches into HFGenerator.model: the shared-context pass is a method."""
    from almost_ray.eval.scoring import score_rows
    from almost_ray.models.text import encode_pair

    rows = [{"key": "a", "context": "The capital of France is", "continuations": [" Paris", " a city"]}]
    shared = score_rows(tiny_generator, rows)[0]["logprobs"]
    ctx, cont = encode_pair(tiny_generator.tokenizer, rows[0]["context"], " Paris")
    assert tiny_generator.shared_context_logprobs([ctx], [[cont]])[0][0] == pytest.approx(shared[0], abs=1e-4)
    assert np.allclose(shared, tiny_generator.loglikelihood(["The capital of France is"] * 2, [" Paris", " a city"]),
                       atol=1e-4)


def test_backends_do_not_import_the_generator_module():
    """No import cycle: the backends and generator.py all build on models/text.py."""
    import subprocess

    code = ("import sys, almost_ray.models.hf_backend, almost_ray.models.vllm_backend; "
            "print('almost_ray.models.generator' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_generate_manifest_counts_what_the_policy_did():
    from almost_ray.generate.stage import _count_fits

    rows = [{"shots_dropped": 0, "prompt_skipped": False}, {"shots_dropped": 2, "prompt_skipped": False},
            {"shots_dropped": 3, "prompt_skipped": True}]
    counts = {"prompts_shortened": 0, "shots_dropped": 0, "prompts_skipped": 0}
    assert list(_count_fits(iter(rows), counts)) == rows
    assert counts == {"prompts_shortened": 1, "shots_dropped": 5, "prompts_skipped": 1}
