"""Every stage that reads data takes JSONL, Parquet, a save_to_disk directory or a hub id, and generated data
exports as a Hugging Face dataset with a card that TRL's trainers read directly."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from almost_ray.cli import main
from almost_ray.data.cards import write_card
from almost_ray.data.preferences import load_pairs
from almost_ray.data.records import RecordError, write_jsonl
from almost_ray.data.sources import load_queries, parse_source, source_hash
from almost_ray.generate.stage import read_prompts
from almost_ray.rl.prompt_data import load_prompts
from almost_ray.runs.manifest import build_manifest, write_manifest
from almost_ray.synth.queries import load_seeds
from almost_ray.train.sft import load_conversations

COMPARISONS = [
    {"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": "No.", "query_id": f"q{i}",
     "chosen_rung": "A", "rejected_rung": "B"}
    for i in range(6)
]
DIALOGUES = [
    {"id": f"d{i}", "messages": [{"role": "user", "content": f"Hi {i}?"}, {"role": "assistant", "content": "Hello."}]}
    for i in range(6)
]
QUERIES = [{"id": f"q{i}", "text": f"What is {i} plus {i}?"} for i in range(6)]


def _forms(tmp_path, name, rows):
    """The same rows as JSONL, one Parquet file, a Parquet directory, save_to_disk Dataset and DatasetDict."""
    import datasets

    jsonl = tmp_path / f"{name}.jsonl"
    write_jsonl(jsonl, rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / f"{name}.parquet"))
    (tmp_path / f"{name}-pq").mkdir()
    ds.to_parquet(str(tmp_path / f"{name}-pq" / "part-0.parquet"))
    ds.save_to_disk(str(tmp_path / f"{name}-disk"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / f"{name}-dict"))
    return {
        "jsonl": str(jsonl),
        "parquet": str(tmp_path / f"{name}.parquet"),
        "parquet_dir": str(tmp_path / f"{name}-pq"),
        "disk": str(tmp_path / f"{name}-disk"),
        "disk_split": str(tmp_path / f"{name}-dict") + "?split=test",
    }


@pytest.mark.parametrize("form", ["jsonl", "parquet", "parquet_dir", "disk", "disk_split"])
def test_every_reader_takes_every_form(tmp_path, form):
    pairs = load_pairs(_forms(tmp_path, "cmp", COMPARISONS)[form])  # train-rm, eval-rm
    assert [p.chosen_response for p in pairs] == [c["chosen"] for c in COMPARISONS]
    assert pairs[0].chosen[0] == {"role": "user", "content": "Question 0?"}
    dialogues = load_conversations(_forms(tmp_path, "dlg", DIALOGUES)[form])  # train-sft
    assert dialogues[3] == DIALOGUES[3]["messages"]
    queries = load_queries(_forms(tmp_path, "qry", QUERIES)[form])  # queries, compare, rmsp
    assert [(q.id, q.text) for q in queries] == [(q["id"], q["text"]) for q in QUERIES]
    prompts = read_prompts(_forms(tmp_path, "gen", QUERIES)[form])  # generate
    assert {k: prompts[1][k] for k in ("id", "messages")} == {
        "id": "q1", "messages": [{"role": "user", "content": QUERIES[1]["text"]}]}
    assert prompts[1]["where"].endswith(":2" if form == "jsonl" else ":1")  # a line number, or a row index
    ppo_prompts = load_prompts(_forms(tmp_path, "ppo", DIALOGUES)[form])  # ppo
    assert ppo_prompts == [d["messages"][0]["content"] for d in DIALOGUES]
    _, seeds = load_seeds(_forms(tmp_path, "seeds", QUERIES)[form])  # queries' seeds
    assert seeds == [q["text"] for q in QUERIES]


def test_columns_are_renamed_and_missing_ids_assigned(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"input": "Why is the sky blue?"}, {"input": "Name a prime."}]).to_parquet(
        str(tmp_path / "prompts.parquet"))
    queries = load_queries(f"{tmp_path}/prompts.parquet?columns=input:text")
    assert [(q.id, q.text) for q in queries] == [("prompts-0", "Why is the sky blue?"), ("prompts-1", "Name a prime.")]
    # StackExchange-style names mapped onto ours
    datasets.Dataset.from_list([{"question": "Q?", "good": "Yes, because.", "bad": "No."}]).to_parquet(
        str(tmp_path / "se.parquet"))
    pair = load_pairs(f"{tmp_path}/se.parquet?columns=question:prompt,good:chosen,bad:rejected")[0]
    assert (pair.chosen_response, pair.rejected_response) == ("Yes, because.", "No.")


def test_a_bad_dataset_row_names_its_index_and_field(tmp_path):
    import datasets

    rows = [dict(COMPARISONS[0]), {**COMPARISONS[1], "chosen": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(RecordError, match=r"bad\.parquet:1: chosen"):
        load_pairs(tmp_path / "bad.parquet")


def test_jsonl_bom_and_invalid_utf8(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(QUERIES[0]).encode() + b"\n")
    assert load_queries(path)[0].text == QUERIES[0]["text"]
    path.write_bytes(json.dumps(QUERIES[0]).encode() + b"\n" + b'{"id": "x", "text": "caf\xe9"}\n')
    with pytest.raises(RecordError, match=r"bom\.jsonl:2: not valid UTF-8"):
        load_queries(path)


def test_a_hub_id_without_network_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert parse_source("someorg/somedata?split=test").kind == "hub"
    started = time.time()
    code = main(["generate", "--input", "someorg/somedata?split=test", "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and time.time() - started < 60
    assert len(err) == 1 and "someorg/somedata" in err[0] and "save_to_disk" in err[0]
    assert not (tmp_path / "o.jsonl").exists()


def test_unknown_source_options_are_refused(tmp_path):
    with pytest.raises(RecordError, match="unknown source option"):
        parse_source(f"{tmp_path}/x.parquet?splt=test")
    with pytest.raises(RecordError, match="theirs:ours"):
        parse_source(f"{tmp_path}/x.parquet?columns=input")


def test_manifest_hashes_follow_the_content(tmp_path):
    forms = _forms(tmp_path, "cmp", COMPARISONS)
    before = source_hash(forms["disk"])
    assert before == source_hash(forms["disk"])
    assert source_hash(forms["jsonl"]) != source_hash(forms["jsonl"] + "?columns=a:b")
    assert source_hash("someorg/somedata?split=test") != source_hash("someorg/somedata?split=train")
    model_dir = tmp_path / "model"  # a model folder is an input too (not a dataset): hashed by its files
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    first = source_hash(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"weights")
    assert source_hash(model_dir) != first


def _finished_stage(tmp_path, stage, filename, rows, config):
    from almost_ray.models.config import ModelConfig

    stage_dir = tmp_path / stage
    write_jsonl(stage_dir / filename, rows)
    manifest = build_manifest(stage, ModelConfig(ref=config), {}, time.time(), counts={"rows": len(rows)})
    write_card(stage_dir, stage, manifest)  # as a stage writes them (runs/stage.py): the card, then the manifest
    write_manifest(stage_dir, manifest)
    return stage_dir


def test_data_stages_write_a_hub_card(tmp_path):
    stage_dir = _finished_stage(tmp_path, "compare", "comparisons.jsonl", COMPARISONS, "embedded:smollm2-135m-instruct")
    text = (stage_dir / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["license"] == "apache-2.0" and header["size_categories"] == ["n<1K"]
    assert header["configs"][0]["data_files"][0]["path"] == "comparisons.jsonl"
    assert "embedded:smollm2-135m-instruct" in text and "rows: 6" in text
    # a stage that generates no data gets no card
    other = tmp_path / "rm"
    from almost_ray.models.config import ModelConfig

    assert write_card(other, "train_rm", build_manifest("train_rm", ModelConfig(), {}, time.time())) is None
    assert not (other / "README.md").exists()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # inside TRL
def test_export_loads_with_datasets_and_passes_trl_data_preparation(tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from almost_ray.models.loading import resolve_model_dir

    compare_dir = _finished_stage(tmp_path, "compare", "comparisons.jsonl", COMPARISONS, "tiny:llama")
    rmsp_dir = _finished_stage(tmp_path, "rmsp", "dialogues.jsonl", DIALOGUES, "tiny:llama")
    assert main(["export", "--stage", "compare", "--stage-dir", str(compare_dir), "--to", str(tmp_path / "cmp")]) == 0
    assert main(["export", "--stage", "rmsp", "--stage-dir", str(rmsp_dir), "--to", str(tmp_path / "dlg")]) == 0
    assert main(["export", "--stage", "rmsp", "--stage-dir", str(rmsp_dir), "--to", str(tmp_path / "disk"),
                 "--format", "disk"]) == 0
    comparisons = datasets.load_dataset(str(tmp_path / "cmp"), split="train")
    dialogues = datasets.load_dataset(str(tmp_path / "dlg"), split="train")
    assert comparisons.num_rows == 6 and {"prompt", "chosen", "rejected"} <= set(comparisons.column_names)
    assert datasets.load_from_disk(str(tmp_path / "disk"))[0]["messages"] == DIALOGUES[0]["messages"]

    model_dir = resolve_model_dir("tiny:llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(tmp_path / "trl"), report_to=[], max_length=64, use_cpu=True)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    reward = RewardTrainer(model=rm, args=RewardConfig(**common), train_dataset=comparisons, processing_class=tokenizer)
    first = reward.train_dataset[0]
    assert first["chosen_ids"] and first["rejected_ids"]
    assert tokenizer.decode(first["chosen_ids"]).count("A careful answer 0.") == 1
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    sft = SFTTrainer(model=lm, args=SFTConfig(**common), train_dataset=dialogues, processing_class=tokenizer)
    assert "Hello." in tokenizer.decode(sft.train_dataset[0]["input_ids"])


def test_export_refuses_an_unfinished_stage(tmp_path, capsys):
    assert main(["export", "--stage", "compare", "--stage-dir", str(tmp_path / "none"), "--to", str(tmp_path / "o")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
