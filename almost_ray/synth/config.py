"""Settings of ALMoST step 1 (Section 2.1, Appendix C): `almost-ray queries` (query mining) and
`almost-ray compare` (the generator ladder, the Heuristic Filter, the As-is RM).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.config_base import StageSection, StrictModel
from almost_ray.models.config import ModelConfig, SamplingParams


class QuerySampling(SamplingParams):
    """ALMoST Appendix C.2: query mining samples with p 0.9 and temperature 1.2, 64 new tokens."""

    temperature: float = Field(default=1.2, ge=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=64, ge=1)


class QueriesConfig(StageSection):
    """`almost-ray queries`: Self-Instruct query mining (ALMoST Appendix C.1).

    Each prompt is `instruction` then `static_shots` seed queries and `dynamic_shots` already-mined
    ones, each as `"{prefix} {query}"` on its own line, ending with `prefix`. Mining runs in rounds of
    `prompts_per_round` prompts (one Ray Data pass each); new queries are deduplicated on the driver
    in a fixed order, so the result depends on `seed`, not on the number of replicas.
    """

    seeds: str | None = Field(
        default=None,
        description="seed queries: a .txt, one per line (a first line '### Instruction: ...' is the instruction, "
        "as in ALMoST's seed_prompts.txt), or rows with `text` in any source form; null: "
        "almost_ray/prompts/seed_queries.txt",
    )
    instruction: str = "Write a question or a request that a person might ask an AI assistant."
    prefix: str = "Query:"
    static_shots: int = Field(default=7, ge=0, description="seed queries per prompt (paper: 7)")
    dynamic_shots: int = Field(default=3, ge=0, description="mined queries per prompt (paper: 3)")
    target: int = Field(default=50, ge=1, description="queries to mine (paper: 10k)")
    prompts_per_round: int = Field(default=32, ge=1, description="prompts per Ray Data pass")
    max_rounds: int = Field(default=100, ge=1, description="give up (with a warning) after this many rounds")
    seed: int = Field(default=0, description="drives shot choice and sampling")
    sampling: QuerySampling = Field(default_factory=QuerySampling)
    banned_words: list[str] = Field(default_factory=lambda: ["image", "graph", "picture", "video"])
    min_chars: int = Field(default=30, ge=1)
    max_chars: int = Field(default=250, ge=1)
    end_chars: str = Field(default="?.!", description="a query must end with one of these ('' disables)")
    rouge_threshold: float = Field(default=0.5, ge=0, le=1, description="keep a query only if its max Rouge-L F < this (strict, as the released code)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    shard_size: int = Field(default=64, ge=1, description="prompts per resumable shard within a round")

    @model_validator(mode="after")
    def _length_window(self) -> QueriesConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(
                f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars}): no query could pass"
            )
        return self


class ResponseSampling(SamplingParams):
    """ALMoST Appendix C.2: responses are sampled with p 0.9 and temperature 1.0, up to 384 tokens."""

    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=384, ge=1)


class RungConfig(StrictModel):
    """One generator of the ladder (ALMoST Section 2.1): a model, a few-shot prompt, its sampling.

    `prompt` is a packaged prompt (`faithful`, `hhh` -> `almost_ray/prompts/<name>.txt`) or a path to a
    file in ALMoST's block format; the first `shots` dialogues are used. Rungs with the same `model` and
    `resources` share one actor pool, so the model is loaded once per replica.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompt: str = "hhh"
    shots: int = Field(default=3, ge=0)
    sampling: ResponseSampling = Field(default_factory=ResponseSampling)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _one_sample(self) -> RungConfig:
        if self.sampling.n != 1:
            raise ValueError("sampling.n must be 1: a rung gives one response per query")
        return self


class HeuristicFilterConfig(StrictModel):
    """ALMoST's Heuristic Filter (Section 2.1 'Post Validation'; rules of the released code).

    A response is dropped when it is shorter than `min_chars`, matches a `bad_patterns` regex anywhere
    (case-insensitive), starts with a `bad_starts` word, ends with a `bad_endings` string, or does not end
    with one of `required_endings` (empty list: no requirement). A pair is kept only if the chosen
    response is at least as long as the rejected one or at least M - `std_factor` * S characters long.
    """

    enabled: bool = True
    min_chars: int = Field(default=50, ge=0)
    bad_patterns: list[str] = Field(
        default_factory=lambda: [r"(don('|’)t|do not)\s+know", r"Human:", r"<Image>"]
    )
    bad_starts: list[str] = Field(default_factory=lambda: ["well"])
    bad_endings: list[str] = Field(default_factory=lambda: ["?", ":"])
    required_endings: list[str] = Field(default_factory=lambda: [".", "!"])
    length_rule: bool = True
    std_factor: float = Field(default=0.5, ge=0)


class AsIsRMConfig(StrictModel):
    """ALMoST's As-is RM filter: a prior RM (paper: trained on StackExchange) must agree with the pair."""

    ref: str = Field(description="reward model reference (HF directory of a sequence classifier)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(default=1024, ge=8)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


def _demo_ladder() -> list[RungConfig]:
    return [RungConfig(name="faithful-3shot", prompt="faithful", shots=3), RungConfig(name="hhh-1shot", shots=1)]


class CompareConfig(StageSection):
    """`almost-ray compare`: synthetic comparisons from a generator ladder (ALMoST Section 2.1).

    `ladder` is ordered best first; every pair of surviving responses to a query is a comparison whose
    chosen response comes from the higher rung (`pairing: all`, the paper's text), or each response is
    chosen at most once, against the next rung it passes the length rule with (`one_per_chosen`, the
    released code).
    """

    queries: str | None = Field(
        default=None, description="queries (a .txt, one per line, or Query rows in any source form); null: the "
        "queries stage's queries.jsonl"
    )
    max_queries: int | None = Field(default=None, ge=1, description="first N queries only")
    ladder: list[RungConfig] = Field(default_factory=_demo_ladder, min_length=2)
    trim_to_sentence: bool = Field(
        default=False, description="cut a response after its last complete sentence (short token budgets)"
    )
    pairing: Literal["all", "one_per_chosen"] = "all"
    heuristic_filter: HeuristicFilterConfig = Field(default_factory=HeuristicFilterConfig)
    as_is_rm: AsIsRMConfig | None = None
    shard_size: int = Field(default=32, ge=1, description="rows per resumable output shard")

    @model_validator(mode="after")
    def _unique_rungs(self) -> CompareConfig:
        names = [r.name for r in self.ladder]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"ladder rung names must be unique, repeated: {dup}")
        return self
