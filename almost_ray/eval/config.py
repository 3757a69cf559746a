"""Settings of `almost-ray eval` (Static HHH, TruthfulQA MC1, response ranking, pairwise judging) and of
`almost-ray eval-rm` (`eval/rm_accuracy.py`). The default prompt texts are in `eval/prompts.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.config_base import StageSection, StrictModel
from almost_ray.models.config import ModelConfig, PromptFormat, SamplingParams

PromptStyle = Literal["human_assistant", "chat"]


class EvalPrompt(StrictModel):
    """A scoring prompt: the suite's default, an inline `template`, or `template_key` of a JSON file.

    `style: chat` renders the template's Human turns through the model's chat template (ALMoST
    Appendix I adapts its prompts to each model's own format); `human_assistant` uses the text as is.
    """

    template: str | None = Field(default=None, description="null: the suite's default (our own wording)")
    template_file: Path | None = Field(default=None, description="JSON object of templates, e.g. ALMoST's")
    template_key: str | None = None
    style: PromptStyle = "human_assistant"


class HHHEvalConfig(StrictModel):
    """Static HHH (Askell et al.; ALMoST Section 3.1): 221 two-choice items, four subsets."""

    data: Path | None = Field(default=None, description="hhh_alignment.jsonl (BIG-bench hhh_alignment)")
    mode: Literal["letter", "answer"] = Field(
        default="letter",
        description="letter: p(' A') vs p(' B') with both options in the prompt, both orders; "
        "answer: p(answer | conversation) for each option",
    )
    prompt: EvalPrompt = Field(default_factory=EvalPrompt, description="letter mode (default HHH_LETTER_TEMPLATE)")
    answer_prompt: EvalPrompt = Field(default_factory=EvalPrompt, description="answer mode (default ANSWER_TEMPLATE)")
    letters: tuple[str, str] = (" A", " B")
    limit: int | None = Field(default=None, ge=1, description="first N items only (smoke runs)")


class TruthfulQAEvalConfig(StrictModel):
    """TruthfulQA MC1 (Lin et al.; ALMoST Section 3.1): 817 questions, one true answer among the choices."""

    data: Path | None = Field(default=None, description="truthfulqa_mc.jsonl (mc1_targets)")
    mode: Literal["answer", "true_false"] = Field(
        default="answer",
        description="answer: log p(choice | question); true_false: log p(' true') - log p(' false') per choice",
    )
    normalize: Literal["none", "tokens", "chars"] = Field(
        default="none", description="answer mode: divide each choice's log-likelihood by its length"
    )
    prompt: EvalPrompt = Field(default_factory=EvalPrompt, description="answer mode (default ANSWER_TEMPLATE)")
    true_false_prompt: EvalPrompt = Field(
        default_factory=EvalPrompt, description="true_false mode (default TRUE_FALSE_TEMPLATE)"
    )
    true_false: tuple[str, str] = (" true", " false")
    limit: int | None = Field(default=None, ge=1)


class RankingEvalConfig(StrictModel):
    """Response ranking (Hewitt et al. Section 4.2): p(response | instruction) > p(other's response | instruction)."""

    data: Path | None = Field(
        default=None, description="JSONL of {prompt|instruction, response|output} or HH-RLHF {chosen} dialogues"
    )
    others_per_item: int = Field(default=1, ge=1, description="other instructions' responses compared per item")
    seed: int = 0
    style: Literal["human_assistant", "chat", "tulu"] = Field(
        default="human_assistant",
        description="the format the model was trained in: tulu for response-tuned and single-task models "
        "(train-sft modes response_tuning / single_task, Hewitt et al.), human_assistant for ALMoST's, chat for "
        "a chat-template model",
    )
    max_chars: int = Field(default=2000, ge=1, description="skip pairs whose instruction or response is longer")
    limit: int | None = Field(default=None, ge=1)


class JudgeEvalConfig(StrictModel):
    """Pairwise judging with order swap (ALMoST Section 3.1, Appendix E; Hewitt et al. Section 3).

    Both models answer each question; the judge sees each pair in both orders; the pair is a tie when
    the two verdicts disagree.
    """

    questions: dict[str, Path] = Field(
        default_factory=dict,
        description="name -> JSONL of questions (Vicuna: 'turns'[0]; AlpacaEval: 'instruction'; or 'text')",
    )
    limit: int | None = Field(default=None, ge=1, description="first N questions of each set")
    prompt_format: PromptFormat = "chat"
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=256)
    )
    kind: Literal["model", "reward"] = Field(
        default="model", description="model: an LM prompted for a verdict (p(' A') vs p(' B')); reward: an RM"
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the judge LM (kind: model)")
    reward_model: str | None = Field(default=None, description="RM reference (kind: reward)")
    prompt: EvalPrompt = Field(default_factory=EvalPrompt, description="the verdict prompt (default JUDGE_TEMPLATE)")
    letters: tuple[str, str] = (" A", " B")
    tie_margin: float = Field(default=0.0, ge=0, description="verdict margins within this are ties")
    decision: Literal["both_orders", "margin_sum"] = Field(
        default="both_orders",
        description="both_orders: the paper's protocol, a tie when the orders disagree; margin_sum: decide on "
        "the sum of both orders' log-odds (cancels a judge's fixed position bias, as for HHH)",
    )


class EvalConfig(StageSection):
    """`almost-ray eval`: score one model (and compare it with `vs`) on the evaluation suites."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    kind: Literal["lm", "reward"] = Field(
        default="lm", description="lm: a causal LM scored by likelihood; reward: an RM (hhh answer mode, truthfulqa)"
    )
    vs: ModelConfig | None = Field(default=None, description="the second model of pairwise judging")
    suites: list[Literal["hhh", "truthfulqa", "ranking", "judge"]] = Field(
        default_factory=lambda: ["hhh", "truthfulqa"]
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="the scorer actor pool")
    shard_size: int = Field(default=256, ge=1, description="scoring rows per resumable shard")
    hhh: HHHEvalConfig = Field(default_factory=HHHEvalConfig)
    truthfulqa: TruthfulQAEvalConfig = Field(default_factory=TruthfulQAEvalConfig)
    ranking: RankingEvalConfig = Field(default_factory=RankingEvalConfig)
    judge: JudgeEvalConfig = Field(default_factory=JudgeEvalConfig)


class EvalRMConfig(StageSection):
    """`almost-ray eval-rm`: pairwise accuracy of an RM next to the always-longer baseline (ALMoST Table 3)."""

    model: str | None = Field(default=None, description="RM reference; null: <run dir>/rm/model")
    max_length: int = Field(default=1024, ge=8)
    limit: int | None = Field(default=None, ge=1, description="first N pairs of each file (smoke runs)")
    inputs: list[Path] = Field(
        default_factory=list,
        description="the pipeline's eval_rm: preference files scored besides the held-out split (HH-RLHF)",
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="the RM scorer actor pool")


class RMScoreConfig(StageSection):
    """The optional `rm_score` stage (`almost-ray pipeline --with rm_score`): every model the run has (base,
    SFT, PPO, GRPO, DPO) samples answers to the same held-out prompts, and the RM scores them: the quantity
    PPO and GRPO maximise, measured on prompts the RM was not trained on."""

    prompts: str | None = Field(
        default=None, description="queries to answer (any source form); null: the queries of train_rm's held-out "
        "comparisons (<run dir>/rm/heldout_comparisons.jsonl), which the RM never trained on")
    limit: int | None = Field(default=None, ge=1, description="the first N prompts only")
    samples_per_prompt: int = Field(
        default=4, ge=1, description="answers sampled per prompt and model (seeded per prompt, the same for every "
        "model)")
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=128),
        description="how each model answers: PPO's rollout sampling by default (temperature 1, 128 new tokens)")
    reward_model: str | None = Field(default=None, description="RM reference; null: <run dir>/rm/model")
    max_length: int = Field(default=1024, ge=8, description="tokens of a scored conversation")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="the RM scorer actor pool")
