"""The bad-input corpus for data files (tests/bad_inputs/data): each case, fed to the stage that reads it
through the real CLI, exits 2 with one error naming file:line and the field, and leaves no output behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from almost_ray.cli import main

CORPUS = Path(__file__).parent / "bad_inputs" / "data"
# file -> what the error must say (after "<file>:")
EXPECTED = {
    "pairs_broken_json.jsonl": ":2: invalid JSON",
    "pairs_missing_field.jsonl": ":1: rejected: field required",
    "pairs_empty_field.jsonl": ":1: chosen: identical to rejected",  # both empty; one empty reply is kept
    "pairs_wrong_type.jsonl": ":1: chosen: expected a string",
    "pairs_degenerate.jsonl": ":1: chosen: identical to rejected",
    "pairs_not_object.jsonl": ":1: expected a JSON object",
    "pairs_empty_file.jsonl": ": no rows",
    "pairs_blank_lines.jsonl": ": no rows",
    "pairs_invalid_utf8.jsonl": ":2: not valid UTF-8",
    "dialogues_roles_not_alternating.jsonl": ":1: messages.1.role: two 'user' turns in a row",
    "dialogues_unknown_role.jsonl": ":1: messages.1.role",
    "dialogues_no_assistant.jsonl": ":1: messages: no assistant turn",
    "dialogues_empty_messages.jsonl": ":1: messages: List should have at least 1 item",
    "dialogues_unknown_field.jsonl": ":1: messages.0.extra",
    "dialogues_empty_file.jsonl": ": no rows",
    "queries_duplicate_ids.jsonl": ":2: id: duplicate id 'q1'",
    "queries_empty_text.jsonl": ":1: text: String should have at least 1 character",
    "queries_wrong_type.jsonl": ":1: text: Input should be a valid string",
    "queries_missing_text.jsonl": ":1: text: Field required",
}
TINY = ["--set", "train_rm.model=tiny:llama", "--set", "train_sft.model=tiny:llama", "--set", "train_rm.num_workers=0",
        "--set", "train_sft.num_workers=0"]


def _command(name: str, path: Path, out: Path) -> list[str]:
    kind = name.split("_", 1)[0]
    if kind == "pairs":
        return ["train-rm", "--input", str(path), "--output", str(out), *TINY]
    if kind == "dialogues":
        return ["train-sft", "--input", str(path), "--output", str(out), *TINY]
    return ["compare", "--queries", str(path), "--output", str(out), *TINY]


def test_the_corpus_is_complete():
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_data_exits_2_naming_file_line_and_field(name, tmp_path, capsys):
    out = tmp_path / "stage"
    assert main(_command(name, CORPUS / name, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{name}{EXPECTED[name]}" in err[0]
    assert not out.exists() or not any(out.rglob("*")), "a failed stage left output behind"


def test_a_huge_line_is_read_and_a_huge_broken_one_is_reported_briefly(tmp_path, capsys):
    from almost_ray.data.preferences import load_pairs

    big = "word " * 1_000_000  # 5 MB on one line
    good = tmp_path / "big.jsonl"
    good.write_text(json.dumps({"prompt": "Summarise.", "chosen": big, "rejected": "No."}) + "\n")
    assert len(load_pairs(good)[0].chosen_response) == len(big.strip())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Summarise.", "chosen": "' + big + "\n")
    assert main(_command("pairs_big", broken, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "broken.jsonl:1: invalid JSON" in err and len(err) < 500
