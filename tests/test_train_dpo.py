"""DPO on the training loop (`train/dpo.py`): the examples, the reply log-probs in both layouts, loss and
metrics equal to TRL 1.16 `DPOTrainer`'s on the same batch, and a planted preference learned end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import run_config

from almost_ray.data.metrics_log import read_metrics
from almost_ray.data.preferences import load_pairs
from almost_ray.models.loading import load_tokenizer, resolve_model_dir
from almost_ray.train import dpo
from almost_ray.train.config import TrainDPOConfig

WORDS = ("apple river stone cloud green quick music table light paper window garden bright summer "
         "horse silver candle forest ocean letter").split()


def _perturbed_tiny(seed: int = 0):
    """tiny:llama with its weights moved a little: a policy that differs from the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny:llama"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_become_prompt_and_scored_reply(tmp_path):
    tokenizer = load_tokenizer("tiny:llama")
    pairs = load_pairs(_write(tmp_path / "a.jsonl", [{"prompt": "Name a fruit.", "chosen": "An apple.",
                                                      "rejected": "A stone."}]))
    [ex] = dpo.encode_pairs(pairs, tokenizer, TrainDPOConfig(max_length=64))
    for side, reply in (("chosen", " An apple."), ("rejected", " A stone.")):
        ids, start = ex[side], ex[f"{side}_start"]
        assert tokenizer.decode(ids[:start]) == "\n\nHuman: Name a fruit.\n\nAssistant:"
        assert tokenizer.decode(ids[start:-1]) == reply and ids[-1] == tokenizer.eos_token_id
    # a prompt that fills max_length leaves no reply token: the pair is dropped
    long = load_pairs(_write(tmp_path / "b.jsonl", [{"prompt": "word " * 40, "chosen": "yes", "rejected": "no"}]))
    assert dpo.encode_pairs(long, tokenizer, TrainDPOConfig(max_length=16)) == []


def _sharing_rows(rng) -> list[dict]:
    """Pairs as DPO sees them: one prompt, two replies; the second pair's replies share their first two
    tokens, so a shared position also predicts a reply token."""
    rows = []
    for prompt_len, shared_reply, a, b in ((6, 0, 4, 7), (3, 2, 5, 3)):
        prompt, common = rng.integers(5, 1000, prompt_len), rng.integers(5, 1000, shared_reply)
        chosen = np.concatenate([prompt, common, rng.integers(5, 1000, a)]).astype(np.int32)
        rejected = np.concatenate([prompt, common, rng.integers(5, 1000, b)]).astype(np.int32)
        rows.append({"chosen": chosen, "chosen_start": prompt_len, "rejected": rejected, "rejected_start": prompt_len})
    return rows


@pytest.mark.parametrize("layout", ["unrelated", "sharing"])
def test_reply_logps_padded_and_padding_free_equal_each_conversation_alone(layout, monkeypatch):
    """Both layouts give every reply the log-prob it gets alone: padded, packed with each pair's shared
    prompt laid down once (`pack_sharing_prefixes`), and packed whole (as under flash-attention, whose
    varlen kernel takes no shared prefix)."""
    from almost_ray.models.packing import pack_sharing_prefixes, use_packed_attention

    model = _perturbed_tiny().eval()
    rng = np.random.default_rng(0)
    rows = [{"chosen": rng.integers(5, 1000, n).astype(np.int32), "chosen_start": s,
             "rejected": rng.integers(5, 1000, m).astype(np.int32), "rejected_start": t}
            for n, s, m, t in ((9, 4, 6, 4), (5, 2, 11, 3))] if layout == "unrelated" else _sharing_rows(rng)
    if layout == "sharing":
        assert pack_sharing_prefixes([(r["chosen"], r["rejected"]) for r in rows]).contexts is not None
    with torch.no_grad():
        want, want_tokens = [], []
        for key in ("chosen", "rejected"):
            for r in rows:
                ids = torch.from_numpy(r[key].astype(np.int64))[None]
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                start = r[f"{key}_start"]
                want.append(sum(logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.size(1))))
                want_tokens.append(ids.size(1) - start)
        padded, tokens = dpo.reply_logps(model, rows, torch.device("cpu"), padding_free=False)
        use_packed_attention(model)
        packed, packed_tokens = dpo.reply_logps(model, rows, torch.device("cpu"), padding_free=True)
        monkeypatch.setattr(dpo, "shares_prefixes", lambda _model: False)
        whole, whole_tokens = dpo.reply_logps(model, rows, torch.device("cpu"), padding_free=True)
    assert tokens.tolist() == want_tokens == packed_tokens.tolist() == whole_tokens.tolist()
    for got in (padded, packed, whole):
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_loss_and_metrics_equal_trl_dpo_trainer(tmp_path, loss_type, padding_free):
    """TRL 1.16 `DPOTrainer.compute_loss` on a batch of 6 pairs and our `micro_loss` on the same token ids,
    policy and reference the same: loss and `rewards/*` agree to 1e-5."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from almost_ray.models.packing import use_packed_attention

    tokenizer = load_tokenizer("tiny:llama")
    rng = random.Random(0)
    rows = [{"prompt": f"\n\nHuman: Tell me about {' '.join(rng.sample(WORDS, 3))}.\n\nAssistant:",
             "chosen": " " + " ".join(rng.sample(WORDS, rng.randint(2, 7))),
             "rejected": " " + " ".join(rng.sample(WORDS, rng.randint(1, 5)))} for _ in range(6)]
    reference = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny:llama"), dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=6, report_to="none", use_cpu=True,
                     beta=0.3, loss_type=[loss_type], bf16=False, max_length=64)
    trainer = DPOTrainer(model=_perturbed_tiny(), ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # the same token ids as TRL's tokenized rows: prompt + reply + EOS, scored from the reply on
    examples = []
    for row in trainer.train_dataset:
        ex = {}
        for side in ("chosen", "rejected"):
            ex[side] = np.asarray(row["prompt_ids"] + row[f"{side}_ids"], dtype=np.int32)
            ex[f"{side}_start"] = len(row["prompt_ids"])
        examples.append(ex)
    cfg = TrainDPOConfig(padding_free=padding_free, micro_batch_size=4, mixed_precision="fp32")
    ours_ref = dpo.reference_logps(resolve_model_dir("tiny:llama"), examples, cfg)
    for ex, (c, r) in zip(examples, ours_ref.tolist()):
        ex["ref_chosen"], ex["ref_rejected"] = c, r
    policy = _perturbed_tiny().eval()
    if padding_free:
        use_packed_attention(policy)
    with torch.no_grad():
        loss_sum, stats = dpo.micro_loss(policy, examples, torch.device("cpu"), padding_free,
                                         loss_type=loss_type, beta=0.3)
    ours = dpo.step_metrics({k: float(v) for k, v in stats.items()}, len(examples), len(examples))
    assert loss_sum.item() / len(examples) == pytest.approx(trl_loss, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert ours[key] == pytest.approx(trl[key], abs=1e-5 if "rewards" in key else 1e-4), key
    assert 0 < trl["rewards/accuracies"] < 1  # a batch where the metric means something


def test_simpo_loss_and_metrics_equal_trl_cpo_trainer(tmp_path, monkeypatch):
    """SimPO lives in TRL 1.16's `CPOTrainer` (`loss_type="simpo"`, `cpo_alpha=0`: no NLL term); our loss and
    `rewards/*` on its tokenized batch agree to 1e-5."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    rng = random.Random(1)
    rows = [{"prompt": f"\n\nHuman: Tell me about {' '.join(rng.sample(WORDS, 3))}.\n\nAssistant:",
             "chosen": " " + " ".join(rng.sample(WORDS, rng.randint(2, 7))),
             "rejected": " " + " ".join(rng.sample(WORDS, rng.randint(1, 5)))} for _ in range(6)]
    args = CPOConfig(output_dir=str(tmp_path / "cpo"), per_device_train_batch_size=6, report_to="none", use_cpu=True,
                     loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, bf16=False, max_length=64)
    trainer = CPOTrainer(model=_perturbed_tiny(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer("tiny:llama"))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        trl_loss, trl = trainer.get_batch_loss_metrics(trainer.model, batch, "train")
    examples = []
    for row in trainer.train_dataset:
        ex = {"ref_chosen": 0.0, "ref_rejected": 0.0}
        for side in ("chosen", "rejected"):
            ex[side] = np.asarray(row[f"{side}_input_ids"], dtype=np.int32)
            ex[f"{side}_start"] = next(i for i, label in enumerate(row[f"{side}_labels"]) if label != -100)
        examples.append(ex)
    with torch.no_grad():
        loss_sum, stats = dpo.micro_loss(_perturbed_tiny().eval(), examples, torch.device("cpu"), loss_type="simpo",
                                         beta=2.0, simpo_gamma=0.5)
    ours = dpo.step_metrics({k: float(v) for k, v in stats.items()}, len(examples), len(examples))
    assert loss_sum.item() / len(examples) == pytest.approx(trl_loss.item(), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[key] == pytest.approx(trl[key], abs=1e-5), key


def planted_pairs(path, n: int, seed: int) -> None:
    """Comparisons whose chosen reply, and only it, contains the word "banana" somewhere."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen, rejected = rng.sample(WORDS, 5), rng.sample(WORDS, 5)
        chosen.insert(rng.randrange(len(chosen) + 1), "banana")
        rows.append({"prompt": "Tell me about " + " ".join(rng.sample(WORDS, 3)) + ".",
                     "chosen": " ".join(chosen) + ".", "rejected": " ".join(rejected) + "."})
    _write(path, rows)


def run_dpo(tmp_path, section: TrainDPOConfig, folder: str):
    """The train_dpo stage on `tmp_path/train.jsonl` into `tmp_path/<folder>`; returns that folder."""
    update = {"comparisons": str(tmp_path / "train.jsonl"), "output_dir": tmp_path / folder}
    return dpo.run(run_config(tmp_path, train_dpo=section.model_copy(update=update)))


def test_dpo_learns_a_planted_preference_and_saves_a_plain_model(tmp_path):
    """Through `loop.fit` in this process: the loss falls and the reward accuracy rises from 0 (policy =
    reference: every reward is 0, a tie), the reference log-probs are stored once, the saved model loads
    with plain transformers and prefers the chosen reply of held-out pairs more than the reference does."""
    from transformers import AutoModelForCausalLM

    planted_pairs(tmp_path / "train.jsonl", 64, seed=0)
    planted_pairs(tmp_path / "heldout.jsonl", 32, seed=1)
    cfg = TrainDPOConfig(model="tiny:llama", num_workers=0, epochs=2, global_batch_size=16, micro_batch_size=8,
                         lr=3e-3, warmup_ratio=0.0, max_length=64, beta=0.5)
    out = run_dpo(tmp_path, cfg, "dpo") / "model"

    rows = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["rewards/accuracies"] == 0.0 and rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert rows[-1]["loss"] < 0.5 and rows[-1]["rewards/accuracies"] >= 0.9, rows
    assert rows[-1]["rewards/margins"] > 0
    stored = tmp_path / "dpo" / dpo.REFERENCE_LOGPS
    assert stored.is_file() and (tmp_path / "dpo" / "training.png").stat().st_size > 0
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert manifest["counts"] == {"pairs": 64, "trained": 64}

    tokenizer = load_tokenizer(out)
    heldout = dpo.encode_pairs(load_pairs(tmp_path / "heldout.jsonl"), tokenizer, cfg)
    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    assert trained.config.architectures == ["LlamaForCausalLM"]
    reference = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny:llama")).eval()
    with torch.no_grad():
        policy_logps, _ = dpo.reply_logps(trained, heldout, torch.device("cpu"))
        ref_logps, _ = dpo.reply_logps(reference, heldout, torch.device("cpu"))
    ratio = policy_logps - ref_logps
    n = len(heldout)
    assert (ratio[:n] > ratio[n:]).float().mean() > 0.9  # DPO's implicit reward ranks held-out pairs

    # done: skipped; a changed beta trains afresh and reuses the stored reference log-probs
    assert run_dpo(tmp_path, cfg, "dpo") / "model" == out
    mtime = stored.stat().st_mtime_ns
    run_dpo(tmp_path, cfg.model_copy(update={"beta": 0.2, "max_steps": 1}), "dpo")
    assert stored.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_dpo_on_two_workers_equals_one_process(tmp_path, ray_local):
    """FSDP2 over 2 Ray Train workers, the reference pass in a Ray task: the same stored reference
    log-probs, losses and weights as one process."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    planted_pairs(tmp_path / "train.jsonl", 16, seed=2)
    base = dict(model="tiny:llama", epochs=1, global_batch_size=8, micro_batch_size=2, lr=1e-3, warmup_ratio=0.0,
                max_length=48, beta=0.5, checkpoint_every=1)
    one = run_dpo(tmp_path, TrainDPOConfig(**base, num_workers=0), "one") / "model"
    two = run_dpo(tmp_path, TrainDPOConfig(**base, num_workers=2), "two") / "model"
    ref_one = load_file(tmp_path / "one" / dpo.REFERENCE_LOGPS)["logps"]
    ref_two = load_file(tmp_path / "two" / dpo.REFERENCE_LOGPS)["logps"]
    torch.testing.assert_close(ref_two, ref_one, atol=1e-5, rtol=1e-6)
    rows_one, rows_two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1, w2 = AutoModelForCausalLM.from_pretrained(one).state_dict(), AutoModelForCausalLM.from_pretrained(two).state_dict()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=2e-5, msg=key)
