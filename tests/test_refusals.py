"""Every stage refuses bad input before it starts Ray, converts or loads a model, or writes anything: each
command runs with the demo config's own resources (two training workers, the embedded model), and exits 2
within seconds with one line naming the file (and line) and the field.

All cases run in one child process on an empty model cache, one `almost-ray` call each: after every call
the child records the exit code, the error lines, the seconds it took, whether Ray was started in the
process, and what the model cache holds (only the embedded tokenizer may be extracted, never the model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
SECONDS = 15.0
CASES = [
    "queries: seeds missing", "queries: seeds empty", "queries: seeds not UTF-8", "queries: seeds a folder",
    "queries: seed row without text", "compare: queries missing", "compare: queries empty",
    "compare: rung model missing", "train-rm: input missing", "train-rm: input empty", "train-rm: a bad row",
    "train-rm: base model missing", "eval-rm: nothing to score", "eval-rm: a causal LM as RM", "rmsp: queries empty",
    "rmsp: RM not trained", "train-sft: input empty", "ppo: policy not trained", "ppo: prompts empty",
    "eval: suite data missing", "eval: model missing", "generate: messages a string",
    "generate: prompt longer than the context", "generate: input empty", "export: a folder it did not write",
    "pipeline: seeds missing", "pipeline: empty config", "pipeline: config is a folder",
]

CHILD = textwrap.dedent('''
    import io, json, os, sys, time
    from contextlib import redirect_stderr, redirect_stdout
    import ray
    from almost_ray.cli import main

    cases = json.loads(sys.argv[1])
    cache = os.environ["ALMOST_RAY_CACHE"]
    out = {}
    for name, argv in cases.items():
        err = io.StringIO()
        t0 = time.time()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = main(argv)
        out[name] = {"code": code, "err": err.getvalue().strip().splitlines(), "seconds": time.time() - t0,
                     "ray": ray.is_initialized(), "cache": sorted(os.listdir(cache)) if os.path.isdir(cache) else []}
    print("RESULT " + json.dumps(out))
''')


def _write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, what the one error line must contain)."""
    run = ["--set", f"runs_dir={tmp / 'runs'}"]
    missing = str(tmp / "missing.jsonl")
    empty = _write(tmp / "empty.jsonl", "")
    not_utf8 = _write(tmp / "latin1.txt", "Caf\xe9?\n".encode("latin-1"))
    folder = str(tmp)
    hi = _write(tmp / "messages_string.jsonl", json.dumps({"messages": "hi"}) + "\n")
    no_text = _write(tmp / "no_text.jsonl", json.dumps({"prompt": "A?"}) + "\n")
    long_prompt = _write(tmp / "long.jsonl", json.dumps({"prompt": "word " * 1_000_000}) + "\n")
    causal_lm = str(_model_dir(tmp))
    theirs = tmp / "theirs"
    _write(theirs / "notes.txt", "keep")
    empty_cfg = _write(tmp / "empty.yaml", "# nothing here\n")
    return {
        "queries: seeds missing": (["queries", "-c", DEMO, *run, "--set", f"queries.seeds={missing}"],
                                   "missing.jsonl: file not found"),
        "queries: seeds empty": (["queries", "-c", DEMO, *run, "--set", f"queries.seeds={empty}"], "empty.jsonl: no rows"),
        "queries: seeds not UTF-8": (["queries", "-c", DEMO, *run, "--set", f"queries.seeds={not_utf8}"],
                                     "latin1.txt: not valid UTF-8"),
        "queries: seeds a folder": (["queries", "-c", DEMO, *run, "--set", f"queries.seeds={folder}"],
                                    "neither a save_to_disk dataset nor Parquet"),
        "queries: seed row without text": (["queries", "-c", DEMO, *run, "--set", f"queries.seeds={no_text}"],
                                           "no_text.jsonl:1: text: expected a non-empty string"),
        "compare: queries missing": (["compare", "-c", DEMO, *run, "--queries", missing], "missing.jsonl: file not found"),
        "compare: queries empty": (["compare", "-c", DEMO, *run, "--queries", empty], "empty.jsonl: no rows"),
        "compare: rung model missing": (["compare", "-c", DEMO, *run, "--queries", _queries(tmp),
                                         "--set", f"compare.ladder.0.model.ref={tmp / 'nope'}"],
                                        "compare.ladder.0.model.ref"),
        "train-rm: input missing": (["train-rm", "-c", DEMO, *run, "--input", missing], "missing.jsonl: file not found"),
        "train-rm: input empty": (["train-rm", "-c", DEMO, *run, "--input", empty], "empty.jsonl: no rows"),
        "train-rm: a bad row": (["train-rm", "-c", DEMO, *run, "--input", str(REPO / "tests" / "bad_inputs" / "data"
                                 / "pairs_degenerate.jsonl")], "pairs_degenerate.jsonl:1: chosen"),
        "train-rm: base model missing": (["train-rm", "-c", DEMO, *run, "--input", _pairs(tmp), "--set",
                                          f"train_rm.model={tmp / 'nope'}"], "train_rm.model: "),
        "eval-rm: nothing to score": (["eval-rm", "-c", DEMO, *run, "--input", missing], "eval_rm: nothing to score"),
        "eval-rm: a causal LM as RM": (["eval-rm", "-c", DEMO, *run, "--input", _pairs(tmp), "--model", causal_lm],
                                       "eval_rm.model: " + causal_lm + ": not a reward model"),
        "rmsp: queries empty": (["rmsp", "-c", DEMO, *run, "--queries", empty], "empty.jsonl: no rows"),
        "rmsp: RM not trained": (["rmsp", "-c", DEMO, *run, "--queries", _queries(tmp)],
                                 "rmsp.reward_model.ref: " + str(tmp / "runs" / "demo" / "rm" / "model")),
        "train-sft: input empty": (["train-sft", "-c", DEMO, *run, "--input", empty], "empty.jsonl: no rows"),
        "ppo: policy not trained": (["ppo", "-c", DEMO, *run], "ppo.policy: " + str(tmp / "runs" / "demo" / "sft")),
        "ppo: prompts empty": (["ppo", "-c", DEMO, *run, "--prompts", empty, "--set", "ppo.policy=tiny:llama",
                                "--set", f"ppo.reward_model={_rm_dir(tmp)}"], "empty.jsonl: no rows"),
        "eval: suite data missing": (["eval", "-c", DEMO, *run, "--suite", "hhh", "--set", f"eval.hhh.data={missing}"],
                                     "eval.hhh: file not found"),
        "eval: model missing": (["eval", "-c", DEMO, *run, "--model", str(tmp / "nope"), "--suite", "hhh",
                                 "--set", f"eval.hhh.data={_hhh(tmp)}"], "eval.model.ref"),
        "generate: messages a string": (["generate", "-c", DEMO, *run, "--input", hi, "--output", str(tmp / "o.jsonl")],
                                        "messages_string.jsonl:1: messages: Input should be a valid list"),
        "generate: prompt longer than the context": (["generate", "-c", DEMO, *run, "--input", long_prompt, "--output",
                                                      str(tmp / "o.jsonl")], "long.jsonl:1: prompt: over"),
        "generate: input empty": (["generate", "-c", DEMO, *run, "--input", empty, "--output", str(tmp / "o.jsonl")],
                                  "empty.jsonl: no rows"),
        "export: a folder it did not write": (["export", "-c", DEMO, *run, "--stage", "compare", "--to", str(theirs)],
                                              "theirs: a folder almost-ray did not write"),
        "pipeline: seeds missing": (["pipeline", "-c", DEMO, *run, "--set", f"queries.seeds={missing}"],
                                    "stage queries: input seeds not found"),
        "pipeline: empty config": (["pipeline", "-c", empty_cfg], "empty.yaml: empty config"),
        "pipeline: config is a folder": (["pipeline", "-c", folder], ": a folder, not a config file"),
    }


def _pairs(tmp: Path) -> str:
    return _write(tmp / "pairs.jsonl", json.dumps({"prompt": "A?", "chosen": "Yes.", "rejected": "No."}) + "\n")


def _queries(tmp: Path) -> str:
    return _write(tmp / "queries.txt", "What is rain?\n")


def _hhh(tmp: Path) -> str:
    row = {"subset": "helpful", "input": "Q?", "targets": [{"text": "A", "score": 1}, {"text": "B", "score": 0}]}
    return _write(tmp / "hhh.jsonl", json.dumps(row) + "\n")


def _model_dir(tmp: Path) -> Path:
    """A causal LM folder (config.json and safetensors, as a real one has), written without transformers."""
    folder = tmp / "causal_lm"
    _write(folder / "config.json", json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    _write(folder / "model.safetensors", b"")
    return folder


def _rm_dir(tmp: Path) -> Path:
    folder = tmp / "rm"
    _write(folder / "config.json", json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                               "model_type": "llama", "num_labels": 1}))
    _write(folder / "model.safetensors", b"")
    return folder


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("refusals")
    table = cases(tmp)
    assert sorted(table) == sorted(CASES)
    cache = tmp / "empty-cache"
    env = {**os.environ, "ALMOST_RAY_CACHE": str(cache), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: v[0] for k, v in table.items()})],
                          capture_output=True, text=True, env=env, cwd=tmp, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    return {name: {**results[name], "want": want} for name, (_, want) in table.items()}


@pytest.mark.parametrize("name", CASES)
def test_refused_in_seconds_before_ray_or_a_model(refusals, name):
    r = refusals[name]
    assert r["code"] == 2, r
    lines = [line for line in r["err"] if line != "almost-ray: config error:"]
    assert len(lines) == 1 and r["want"] in lines[0], r["err"]
    assert r["seconds"] < SECONDS, f"{name}: refused after {r['seconds']:.1f} s"
    assert not r["ray"], f"{name}: Ray was started"
    assert set(r["cache"]) <= {"smollm2-tokenizer"}, f"{name}: the model cache holds {r['cache']}"
