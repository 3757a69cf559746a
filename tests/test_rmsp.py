"""RMSP turn logic (ALMoST Section 2.2) without Ray: best-of-N, turn-taking, stop strings, degenerate turns."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import LogitsProcessor

from almost_ray.cli import SUBCOMMANDS, main
from almost_ray.config import load_config
from almost_ray.config_base import ConfigError
from almost_ray.models.config import SamplingParams
from almost_ray.prompts.templates import fewshot_header, load_prompt_text
from almost_ray.rmsp import turns
from almost_ray.rmsp.turns import generate_candidates, score_candidates
from almost_ray.rmsp.vs_self_play import compare_records


class KnownScoresRM:
    """A fixture RM whose score of a conversation is looked up from its last (judged) turn."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.calls: list[list[dict]] = []

    def score(self, conversations):
        self.calls.extend(conversations)
        return [self.scores[c[-1]["content"]] for c in conversations]


def _batch(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def _with_candidates(row: dict, candidates: list[str]) -> dict:
    return {**row, "candidates": json.dumps(candidates)}


# ---- best-of-N ------------------------------------------------------------------------------------


def test_best_of_n_is_argmax_over_usable_candidates():
    assert turns.best_of_n([0.1, 2.0, -1.0, 1.5], [True] * 4) == 1
    assert turns.best_of_n([0.1, 2.0, -1.0, 1.5], [True, False, True, True]) == 3
    assert turns.best_of_n([1.0, 1.0, 0.0], [True] * 3) == 0  # ties: the first
    assert turns.best_of_n(None, [False, True, True]) == 1  # no RM: the first usable sample
    assert turns.best_of_n([1.0, 2.0], [False, False]) is None
    with pytest.raises(ValueError):
        turns.best_of_n([1.0], [True, True])


def test_fixture_rm_scores_in_context_and_the_argmax_is_kept():
    rm = KnownScoresRM({"short": 0.5, "best answer": 3.0, "meh": -1.0, "ok": 1.0})
    row = _with_candidates(turns.start_row("q1", "Tell me something."), ["short", "best answer", "meh", "ok"])
    scored = score_candidates(rm, _batch([row]))
    assert json.loads(scored["scores"][0]) == [0.5, 3.0, -1.0, 1.0]
    # every candidate was judged as the next assistant turn of the conversation so far
    assert all(c[:-1] == [{"role": "user", "content": "Tell me something."}] for c in rm.calls)
    out = turns.select_batch(scored, turn=1, max_turns=2).to_dict("records")[0]
    assert json.loads(out["messages"])[-1] == {"role": "assistant", "content": "best answer"}
    (turn,) = json.loads(out["turns"])
    assert turn["chosen"] == 1 and turn["scores"] == [0.5, 3.0, -1.0, 1.0] and out["status"] == ""


def test_real_tiny_rm_picks_its_own_argmax(tmp_path):
    from almost_ray.models.reward import RewardModel

    torch.manual_seed(0)
    rm = RewardModel("tiny:llama", dtype="float32", device="cpu")
    candidates = ["Paris is the capital.", "I think it is Lyon.", "France's capital city is Paris.", "No idea."]
    row = _with_candidates(turns.start_row("q1", "What is the capital of France?"), candidates)
    scored = score_candidates(rm, _batch([row]))
    scores = json.loads(scored["scores"][0])
    expected = rm.score([[{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": c}] for c in candidates])
    assert scores == pytest.approx(expected, abs=1e-5)
    out = turns.select_batch(scored, turn=1, max_turns=1).to_dict("records")[0]
    assert json.loads(out["turns"])[0]["chosen"] == max(range(4), key=lambda i: scores[i])
    assert out["status"] == turns.MAX_TURNS


def test_a_base_lm_as_rm_scores_the_same_in_every_replica():
    """An As-is RM built from a base LM has a fresh head; every replica and every run must agree on it,
    or the As-is filter keeps different pairs on different workers."""
    from almost_ray.models.reward import RewardModel

    texts = ["Human: Hi\n\nAssistant: Hello there.", "Human: Hi\n\nAssistant: Go away."]
    torch.manual_seed(1)
    first = RewardModel("tiny:llama", dtype="float32", device="cpu").score_texts(texts)
    torch.manual_seed(2)
    second = RewardModel("tiny:llama", dtype="float32", device="cpu").score_texts(texts)
    assert first == second and first[0] != first[1]


def test_plain_self_play_keeps_the_single_sample_without_scores():
    row = _with_candidates(turns.start_row("q1", "Hi there, how are you?"), ["Fine, thanks for asking."])
    out = turns.select_batch(_batch([row]), turn=1, max_turns=2).to_dict("records")[0]
    (turn,) = json.loads(out["turns"])
    assert turn["chosen"] == 0 and turn["scores"] is None


# ---- role prompts and stop strings -----------------------------------------------------------------


def test_role_prompts_end_where_each_role_speaks():
    header = fewshot_header(load_prompt_text("user"), 1)
    messages = [{"role": "user", "content": "Why is the sea salty?"}, {"role": "assistant", "content": "Rivers."}]
    user = turns.role_prompt("user", messages, header)
    assert user.startswith(header.rstrip("\n")) and user.endswith("\n\nAssistant: Rivers.\n\nHuman:")
    assistant = turns.role_prompt("assistant", messages[:1], header)
    assert assistant.endswith("\n\nHuman: Why is the sea salty?\n\nAssistant:")
    with pytest.raises(ValueError):
        turns.role_prompt("narrator", messages, header)


def test_user_prompt_file_is_in_almost_block_format():
    text = load_prompt_text("user")
    blocks = text.split("\n\n-----")
    assert "follow-up" in blocks[0] and len(blocks) >= 4
    for dialogue in blocks[1:]:
        lines = [ln for ln in dialogue.strip().split("\n\n") if ln]
        speakers = [ln.split(":", 1)[0] for ln in lines]
        assert speakers[0] == "Human" and speakers.count("Human") >= 2  # the human follows up
        assert all(a != b for a, b in zip(speakers, speakers[1:]))  # turns alternate


class ForceText(LogitsProcessor):
    """Makes the model write fixed token ids, so a test knows what the stop strings must cut."""

    def __init__(self, ids: list[int], prompt_len: int):
        self.ids, self.prompt_len = ids, prompt_len

    def __call__(self, input_ids, scores):
        step = min(input_ids.shape[1] - self.prompt_len, len(self.ids) - 1)
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[step]] = 0.0
        return out


class Forced:
    def __init__(self, generator, text: str, prompt: str):
        tok = generator.tokenizer
        self.generator = generator
        self.processor = ForceText(tok(text, add_special_tokens=False).input_ids,
                                   len(tok(prompt, add_special_tokens=False).input_ids))

    def generate(self, prompts, params):
        return self.generator.generate(prompts, params, logits_processors=[self.processor])


@pytest.mark.parametrize(
    ("role", "written", "kept"),
    [
        ("user", " Could you say more about that?\n\nAssistant: Sure, here is more", "Could you say more about that?"),
        ("assistant", " Rivers carry salt.\n\nHuman: thanks\n\nAssistant: ok", "Rivers carry salt."),
        ("assistant", " Rivers carry salt.\n\n-----\n\nHuman: next dialogue", "Rivers carry salt."),
        ("user", " Why? Human: I mean, really? Assistant: yes", "Why?"),
    ],
)
def test_stop_strings_keep_each_role_to_its_own_turn(tiny_generator, role, written, kept):
    messages = [{"role": "user", "content": "Why is the sea salty?"}]
    if role == "user":
        messages.append({"role": "assistant", "content": "Minerals from rocks."})
    row = turns.start_row("q", "x")
    row["messages"] = json.dumps(messages)
    prompt = turns.role_prompt(role, messages, "")
    forced = Forced(tiny_generator, written, prompt)
    params = SamplingParams(temperature=0, max_new_tokens=40, stop=turns.role_stop(role))
    out = generate_candidates(forced, params, role, "", _batch([row]))
    assert json.loads(out["candidates"][0]) == [kept]


# ---- turn-taking and degenerate turns ---------------------------------------------------------------


def test_turn_taking_alternates_roles_and_stops_at_max_turns(tiny_generator):
    """Real tiny models play both roles (no Ray): T = 3 gives user/assistant x 3 and nothing after."""
    max_turns, n = 3, 2
    assistant = SamplingParams(n=n, temperature=1.0, top_p=0.9, max_new_tokens=6, stop=turns.role_stop("assistant"))
    user = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, stop=turns.role_stop("user"))
    batch = _batch([turns.start_row("q1", "How do I start running?"), turns.start_row("q2", "What is rain?")])
    rm = KnownScoresRM({})
    rm.score = lambda convs: [float(len(c[-1]["content"])) for c in convs]  # longest wins
    for t in range(1, max_turns + 2):  # one extra round: finished dialogues must not grow
        batch = generate_candidates(tiny_generator, assistant, "assistant", "", batch)
        batch = turns.select_batch(score_candidates(rm, batch), t, max_turns)
        batch = turns.user_batch(generate_candidates(tiny_generator, user, "user", "", batch))
    for row in batch.to_dict("records"):
        rec = turns.dialogue_record(row, {})
        roles = [m["role"] for m in rec["messages"]]
        assert roles == ["user", "assistant"] * max_turns
        assert rec["num_turns"] == max_turns and rec["end_reason"] == turns.MAX_TURNS
        assert [t["turn"] for t in rec["assistant_turns"]] == [1, 2, 3]
        for t, m in zip(rec["assistant_turns"], rec["messages"][1::2]):
            assert len(t["candidates"]) == n and m["content"] == t["candidates"][t["chosen"]].strip()


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "empty"), ("   \n", "empty"), ("?!... --", "no_words"), ("the the the the the the a the the the the the", "loop"),
     ("Why is the sea salty?", "echo"), ("Because rivers carry dissolved minerals.", None)],
)
def test_degenerate_reason(text, reason):
    assert turns.degenerate_reason(text, ["Why is the sea salty?"]) == reason


def test_degenerate_turns_end_dialogues_early_and_are_counted():
    rm = KnownScoresRM({"": 5.0, "   ": 4.0, "A fine answer.": 1.0})
    dead = _with_candidates(turns.start_row("dead", "Hello?"), ["", "   "])
    alive = _with_candidates(turns.start_row("alive", "Hello!"), ["", "A fine answer."])
    batch = turns.select_batch(score_candidates(rm, _batch([dead, alive])), 1, 2)
    rows = {r["id"]: r for r in batch.to_dict("records")}
    assert rows["dead"]["status"] == turns.DEGENERATE_ASSISTANT
    # the empty sample scored higher but is not usable: the usable one is kept
    assert json.loads(rows["alive"]["turns"])[0]["chosen"] == 1 and rows["alive"]["status"] == ""
    alive_after_user = turns.user_batch(_batch([_with_candidates(rows["alive"], [""])])).to_dict("records")[0]
    assert alive_after_user["status"] == turns.DEGENERATE_USER
    records = [turns.dialogue_record(rows["dead"], {}), turns.dialogue_record(alive_after_user, {})]
    assert [r["num_turns"] for r in records] == [0, 1]
    assert records[1]["messages"][-1]["role"] == "assistant" and records[1]["dropped_user"]["reason"] == "empty"
    assert turns.end_counts(records) == {"ended_degenerate_assistant": 1, "ended_degenerate_user": 1,
                                          "turns_0": 1, "turns_1": 1}


# ---- metrics and the comparison ---------------------------------------------------------------------


def _rec(rid: str, per_turn: list[tuple[list[float], int]]) -> dict:
    return {"id": rid, "assistant_turns": [{"turn": i, "scores": s, "chosen": c} for i, (s, c) in enumerate(per_turn, 1)]}


def test_turn_metrics_gap_is_chosen_minus_mean_of_n():
    m = turns.turn_metrics([_rec("a", [([1.0, 3.0], 1), ([0.0, 2.0], 1)]), _rec("b", [([2.0, 0.0], 0)])], 2)
    assert m["1"]["mean_chosen_reward"] == 2.5 and m["1"]["mean_first_sample_reward"] == 1.5
    assert m["1"]["mean_best_minus_mean"] == 1.0 and m["2"]["reached"] == 1 and m["2"]["mean_best_minus_mean"] == 1.0


def test_compare_records_pairs_the_same_queries():
    rmsp = [_rec("a", [([1.0, 3.0], 1), ([2.0, 0.0], 0)]), _rec("b", [([0.0, 1.0], 1)])]
    plain = [_rec("a", [([0.5], 0), ([1.0], 0)]), _rec("b", [([2.0], 0)]), _rec("c", [([9.0], 0)])]
    out = compare_records(rmsp, plain, 2)
    assert out["1"]["paired_dialogues"] == 2 and out["1"]["rmsp_mean_reward"] == 2.0
    assert out["1"]["self_play_mean_reward"] == 1.25 and out["1"]["rmsp_higher_share"] == 0.5
    assert out["2"] == {"paired_dialogues": 1, "rmsp_mean_reward": 2.0, "self_play_mean_reward": 1.0,
                        "mean_difference": 1.0, "rmsp_higher_share": 1.0}


# ---- config and CLI ---------------------------------------------------------------------------------


def test_config_defaults_switches_and_shipped_configs():
    cfg = load_config(None, ["rmsp.user.model.ref=tiny:llama", "rmsp.user.sampling.max_new_tokens=8"])
    assert cfg.rmsp.user.prompt == "user" and cfg.rmsp.user.sampling.top_p == 0.9  # defaults survive overrides
    assert (cfg.rmsp.best_of, cfg.rmsp.max_turns, cfg.rmsp.assistant.sampling.max_new_tokens) == (4, 2, 384)
    assert load_config(None, ["rmsp.reward_model=null"]).rmsp.reward_model is None
    with pytest.raises(ConfigError, match="best_of"):
        load_config(None, ["rmsp.assistant.sampling.n=4"])
    for path in ("configs/demo.yaml", "configs/paper-llama.yaml"):
        assert load_config(path).rmsp.best_of == 4


def test_cli_has_rmsp_and_names_missing_queries(tmp_path, capsys):
    assert "rmsp" in SUBCOMMANDS
    code = main(["rmsp", "--set", f"runs_dir={tmp_path}", "--set", "rmsp.reward_model=null"])
    assert code == 2 and "rmsp.queries" in capsys.readouterr().err


def test_missing_model_paths_are_config_errors_naming_the_field(tmp_path, capsys):
    (tmp_path / "q.txt").write_text("Hello?\n")
    base = ["rmsp", "--queries", str(tmp_path / "q.txt"), "--set", f"runs_dir={tmp_path}"]
    assert main(base) == 2  # no RM set and no <run dir>/rm/model from train-rm
    assert "train-rm" in capsys.readouterr().err
    assert main([*base, "--set", f"rmsp.reward_model.ref={tmp_path / 'no-rm'}"]) == 2
    assert "rmsp.reward_model.ref" in capsys.readouterr().err
    assert main([*base, "--set", "rmsp.reward_model.ref=tiny:llama", "--set", "rmsp.user.model.ref=/nope"]) == 2
    assert "rmsp.user.model.ref" in capsys.readouterr().err
    assert main([*base, "--set", "rmsp.reward_model.ref=tiny:llama", "--set", "rmsp.user.prompt=/nope.txt"]) == 2
    assert "rmsp.user.prompt" in capsys.readouterr().err
