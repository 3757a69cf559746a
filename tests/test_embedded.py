"""Integration: the embedded SmolLM2-135M-Instruct answers a factual question correctly."""

from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.hf_backend import HFGenerator


def test_embedded_model_knows_the_capital_of_france():
    gen = HFGenerator(ModelConfig(ref="embedded:smollm2-135m-instruct", dtype="float32"), device="cpu")
    prompt = gen.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    [[answer]] = gen.generate([prompt], SamplingParams(temperature=0, max_new_tokens=24))
    assert "Paris" in answer
    paris, london = gen.loglikelihood(["The capital of France is"] * 2, [" Paris", " London"])
    assert paris > london
