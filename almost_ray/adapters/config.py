"""Settings of Hewitt et al.'s 3-rule adapter (Section 6, Table 8; `adapters/rules.py`), Table 8's token
biases as the released code sets them, and the one number where the code and the table differ.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from almost_ray.config_base import StrictModel


class TokenBias(StrictModel):
    """One line of Hewitt et al.'s Table 8: token strings (as they appear in text) and the score added."""

    strings: list[str] = Field(min_length=1, description="surface text of each token, e.g. ' I' (with its space)")
    weight: float


# Rule 2's "What" score: -5 in Listing 1 and the released combined_model.py (our default), -3 in Table 8.
WHAT_WEIGHT_LISTING1, WHAT_WEIGHT_TABLE8 = -5.0, -3.0


def _table8_biases() -> list[TokenBias]:
    # Hewitt et al. rule 2 as their released code (Listing 1) sets it, Llama-2 pieces written as text:
    # "▁We" is the word-initial " We" (Table 8's bare "We" is not what the code biases), "What" -5.
    rows = [
        (["<", " <", "|"], -4.0),
        ([" I", "I"], -5.0),
        ([" We"], -3.0),
        (["What"], WHAT_WEIGHT_LISTING1),
        ([" should"], -6.0),
        ([" *", " -", "   ", " #", " ##", "\n", "!"], 1.0),
    ]
    return [TokenBias(strings=s, weight=w) for s, w in rows]


class RulesConfig(StrictModel):
    """Hewitt et al.'s 3-rule adapter (Section 6, Table 8), applied at decoding time when `enabled`.

    Set a rule's weight to 0 (or `biases: []`) to ablate it as in their Table 4.
    """

    enabled: bool = False
    eos_weight: float = Field(default=15.0, description="rule 1: EOS gets eos_weight * len / eos_horizon")
    eos_horizon: int = Field(default=250, ge=1, description="rule 1: response length (tokens) of the full bonus")
    eos_hold_after_horizon: bool = Field(
        default=False,
        description="rule 1 past the horizon: false = no bonus (the paper's code), true = keep eos_weight",
    )
    biases: list[TokenBias] = Field(default_factory=_table8_biases, description="rule 2: fixed token scores")
    repeat_penalty: float = Field(default=-1.5, description="rule 3: added to every distinct token in its scope")
    repeat_scope: Literal["after_last_user", "response"] = Field(
        default="after_last_user",
        description="rule 3's scope: every token after the last user tag, instruction included (Listing 1), "
        "or the response only",
    )
    user_tag: str = Field(
        default="<|user|>\n", min_length=1,
        description="rule 3: the text that opens a user turn (Tulu's, as Listing 1); a prompt without it is "
        "in scope whole, as in the reference",
    )
