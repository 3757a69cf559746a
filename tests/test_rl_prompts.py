"""Which prompts PPO trains on: first user turns of the RMSP dialogues, or an explicit prompts source."""

from __future__ import annotations

import json

import pytest

from almost_ray.config import Config
from almost_ray.data.records import RecordError
from almost_ray.rl import stage
from almost_ray.rl.prompt_data import load_prompts
from almost_ray.runs import paths


def _dialogues(run_dir, rows):
    path = run_dir / "rmsp" / "dialogues.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, **ppo) -> Config:
    return Config(runs_dir=tmp_path.parent, run_name=tmp_path.name, ppo=ppo)


def test_first_user_turns_of_rmsp_dialogues_in_file_order(tmp_path):
    _dialogues(tmp_path, [
        {"messages": [{"role": "user", "content": " How do I boil an egg? "},
                      {"role": "assistant", "content": "Put it in water."},
                      {"role": "user", "content": "For how long?"}]},
        {"messages": [{"role": "system", "content": "Be nice."},
                      {"role": "user", "content": "Name a prime."},
                      {"role": "assistant", "content": "7"}], "id": "d2"},
    ])
    assert load_prompts(paths.ppo_prompts(_cfg(tmp_path))) == ["How do I boil an egg?", "Name a prime."]


def test_explicit_sources_win_over_the_dialogues(tmp_path):
    _dialogues(tmp_path, [{"messages": [{"role": "user", "content": "from rmsp"}]}])
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"id": "q1", "text": "a query"}) + "\n\n" + json.dumps({"prompt": "a prompt"}) + "\n")
    assert load_prompts(paths.ppo_prompts(_cfg(tmp_path, prompts=str(txt)))) == ["first", "second"]
    assert load_prompts(paths.ppo_prompts(_cfg(tmp_path, prompts=str(jsonl)))) == ["a query", "a prompt"]


def test_missing_empty_and_malformed_sources_name_the_file(tmp_path, tiny_rm):
    cfg = _cfg(tmp_path, policy="tiny:llama", reward_model=str(tiny_rm))
    with pytest.raises(RecordError, match=r"ppo.prompts: .*rmsp/dialogues.jsonl: file not found \(run `almost-ray rmsp`"):
        stage.check(cfg)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(RecordError, match="empty.txt: no rows"):
        load_prompts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(RecordError, match="bad.jsonl:2: messages: no user turn"):
        load_prompts(str(bad))
