"""One home for each piece of shared code (issue 11, item 11): the tokenizer loader, `Messages`, stop strings."""

from __future__ import annotations

import re
from pathlib import Path

import almost_ray

PACKAGE = Path(almost_ray.__file__).parent
# The loader itself, and the conversions beside it (a GGUF's tokenizer, a layer-truncated copy for vLLM).
CONVERSIONS = {"models/loading.py"}


def sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path.read_text(encoding="utf-8")


def test_one_tokenizer_loader_with_padding_and_truncation_sides():
    from almost_ray.models.loading import load_tokenizer, resolve_model_dir
    from almost_ray.train import reward, sft

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
    assert definitions == ["records.py"]


def test_stop_strings_defined_once():
    from almost_ray.rmsp.turns import role_stop
    from almost_ray.templates import STOP_STRINGS, default_stop

    assert role_stop("assistant") == default_stop("human_assistant") == STOP_STRINGS["human_assistant"]["assistant"]
    assert role_stop("user") == default_stop("human_assistant", "user")
    assert role_stop("user", ["\n\n"]) == [*default_stop("human_assistant", "user"), "\n\n"]
    lists = [name for name, text in sources() if re.search(r'\[STOP_HUMAN|"\\nHuman:"\]', text)]
    assert lists == ["templates.py"]
