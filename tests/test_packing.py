"""Padding-free batches (`models.packing`): a packed row gives each sequence exactly what it gets alone,
and the RM, SFT and DPO losses, with their gradients, equal the padded path's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from almost_ray.models.loading import resolve_model_dir
from almost_ray.models.packing import pack_pairs, pack_sequences, pack_sharing_prefixes, use_packed_attention
from almost_ray.train import dpo, sft
from almost_ray.train import rm as reward
from almost_ray.train.data import pad_batch
from almost_ray.train.losses import IGNORE_INDEX

LENGTHS = (23, 5, 17, 1, 30, 11)


def _sequences(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 2000, size=n).astype(np.int32) for n in LENGTHS]


def test_pack_sequences_restarts_positions_and_marks_the_ends():
    row = pack_sequences([[7, 8, 9], [4], [5, 6]])
    assert row.input_ids.tolist() == [[7, 8, 9, 4, 5, 6]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert row.starts == [0, 3, 4, 6] and row.ends.tolist() == [2, 3, 5]
    kwargs = row.attention_kwargs("cpu")
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and kwargs["max_length_q"] == 3
    with pytest.raises(ValueError, match="non-empty"):
        pack_sequences([[1], []])


def test_a_shared_prefix_is_laid_down_once_and_each_remainder_attends_to_it():
    row = pack_sharing_prefixes([([7, 8, 9, 1], [7, 8, 2]), ([5], [6, 3]), ([4, 4], [4, 4, 4])])
    # group 1 shares [7, 8]; group 2 shares nothing; in group 3 one sequence is the other's prefix, so one
    # token stays its own (its score is read there)
    assert row.input_ids.tolist() == [[7, 8, 9, 1, 2, 5, 6, 3, 4, 4, 4, 4]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 0, 1, 0, 1, 1, 2]]
    assert row.starts == [0, 2, 4, 5, 6, 8, 9, 10, 12]
    assert row.contexts == [(0, 0), (0, 2), (0, 2), (0, 0), (0, 0), (0, 0), (8, 9), (8, 9)]
    assert row.ends.tolist() == [3, 4, 5, 7, 9, 11]
    # where each sequence's tokens are: its prefix's segment, then its own
    assert [w.tolist() for w in row.token_rows()] == [[0, 1, 2, 3], [0, 1, 4], [5], [6, 7], [8, 9], [8, 10, 11]]
    for seq, where in zip([[7, 8, 9, 1], [7, 8, 2], [5], [6, 3], [4, 4], [4, 4, 4]], row.token_rows()):
        assert row.input_ids[0, where].tolist() == seq
    assert [w.tolist() for w in pack_sequences([[7, 8], [4]]).token_rows()] == [[0, 1], [2]]
    # pairs come back every first, then every second, whichever way they are packed
    pairs = [([7, 8, 9, 1], [7, 8, 2]), ([5], [6, 3])]
    shared, whole = pack_pairs(pairs, share=True), pack_pairs(pairs, share=False)
    assert shared.ends.tolist() == [3, 5, 4, 7] and whole.ends.tolist() == [3, 4, 7, 9]
    for row in (shared, whole):
        assert [row.input_ids[0, w].tolist() for w in row.token_rows()] == [[7, 8, 9, 1], [5], [7, 8, 2], [6, 3]]
    assert pack_sharing_prefixes([([1, 2], [1, 3])], min_shared=2).contexts is None


def test_a_shared_prefix_row_gives_every_sequence_its_own_logits():
    """Each sequence of a row with shared prefixes gets the logits it gets alone: its prefix's segment
    followed by its own remainder's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny:llama"), dtype=torch.float32)
    base = _sequences(2)
    groups = [(base[0], np.concatenate([base[0][:9], base[1]])), (base[2], base[3]),
              (base[4], np.concatenate([base[4][:20], base[5]]), base[4][:25])]
    use_packed_attention(model)
    with torch.no_grad():
        row = pack_sharing_prefixes(groups)
        shared = model(input_ids=row.input_ids, **row.attention_kwargs("cpu")).logits[0]
        alone = [[model(input_ids=torch.as_tensor(s, dtype=torch.long)[None]).logits[0] for s in g] for g in groups]
    assert row.input_ids.size(1) == sum(len(s) for g in groups for s in g) - 9 - 2 * 20  # each prefix once
    segment = 0
    for logits in alone:
        prefix = row.contexts[segment + 1]  # the group's first remainder names its prefix, (0, 0) for none
        segment += prefix != (0, 0)
        for seq_logits in logits:
            a, b = row.starts[segment], row.starts[segment + 1]
            got = torch.cat([shared[prefix[0] : prefix[1]], shared[a:b]])
            torch.testing.assert_close(got, seq_logits, rtol=1e-5, atol=1e-5, msg=f"segment {segment}")
            segment += 1


def test_a_packed_row_gives_every_sequence_its_own_logits():
    """No token attends across a sequence boundary, positions restart: each slice of the packed row's
    logits equals that sequence's logits in a padded batch; a padded batch still works after the switch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny:llama"), dtype=torch.float32)
    seqs = _sequences()
    input_ids = pad_batch(seqs, 0)
    lens = torch.tensor([len(s) for s in seqs])
    attention_mask = (torch.arange(input_ids.size(1))[None, :] < lens[:, None]).long()
    with torch.no_grad():
        padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
        use_packed_attention(model)
        row = pack_sequences(seqs)
        packed = model(input_ids=row.input_ids, **row.attention_kwargs("cpu")).logits[0]
        again = model(input_ids=input_ids, attention_mask=attention_mask).logits
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(packed[row.starts[i] : row.starts[i + 1]], padded[i, : len(seq)],
                                   rtol=1e-5, atol=1e-5, msg=f"sequence {i}")
    torch.testing.assert_close(again, padded, rtol=0, atol=0)


def test_packed_attention_under_bf16_autocast_on_cpu_runs_in_fp32(monkeypatch):
    """CPU's bf16 SDPA backward is 2.5x slower than fp32's at PPO's sizes: under autocast the packed
    attention runs in fp32 with autocast off, and the model still backpropagates through it."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny:llama"), dtype=torch.float32)
    use_packed_attention(model)
    row = pack_sequences(_sequences()[:3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=row.input_ids, **row.attention_kwargs("cpu")).logits
    logits.float().sum().backward()
    assert seen and set(seen) == {(torch.float32, torch.float32, torch.float32, False)}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _loss_and_grads(task, load, rows, padding_free: bool):
    torch.manual_seed(0)
    model = load(resolve_model_dir("tiny:llama"))
    if padding_free:
        use_packed_attention(model)
    loss, stats = task.micro_loss(model, rows, torch.device("cpu"), padding_free)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, grads


@pytest.mark.parametrize("task", ["rm", "sft"])
def test_padding_free_loss_and_gradients_equal_the_padded_ones(task):
    seqs = _sequences(1)
    if task == "rm":
        module = reward
        rows = [{"chosen": seqs[i], "rejected": seqs[i + 1]} for i in range(0, len(seqs), 2)]

        def load(model_dir):
            model = reward.load_model(model_dir)
            model.config.pad_token_id = 0
            return model
    else:
        module, load = sft, sft.load_model
        rows = []
        for k, seq in enumerate(seqs):
            labels = seq.copy()
            labels[: len(seq) // 2] = IGNORE_INDEX  # a prompt half, then the supervised reply
            rows.append({"input_ids": seq, "labels": labels if k != 3 else np.full_like(seq, IGNORE_INDEX)})
    loss, stats, grads = _loss_and_grads(module, load, rows, padding_free=False)
    if task == "rm":  # the reward at the last token is what a plain classifier pools
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        plain = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_dir("tiny:llama"), config=reward.load_config(resolve_model_dir("tiny:llama")))
        plain.config.pad_token_id = 0
        ids = pad_batch([r["chosen"] for r in rows] + [r["rejected"] for r in rows], 0)
        lens = torch.tensor([len(r["chosen"]) for r in rows] + [len(r["rejected"]) for r in rows])
        with torch.no_grad():
            pooled = plain(input_ids=ids, attention_mask=(torch.arange(ids.size(1))[None] < lens[:, None]).long())
        torch.testing.assert_close(stats["reward"], pooled.logits.sum(), rtol=1e-5, atol=1e-5)
    _assert_same(_loss_and_grads(module, load, rows, padding_free=True), (loss, stats, grads))


def test_rm_pairs_sharing_their_conversation_give_the_padded_loss_and_gradients():
    """Padding-free RM pairs whose conversations share everything but the last reply compute the shared part
    once (`pack_sharing_prefixes`): the loss, the rewards and every gradient equal the padded batch's."""
    seqs = _sequences(3)
    # the rejected conversation is the chosen one cut short: every token but its last is shared
    rows = [{"chosen": np.concatenate([seqs[i], seqs[i + 1]]), "rejected": np.concatenate([seqs[i], seqs[i + 1][:3]])}
            for i in range(0, len(seqs), 2)]

    def load(model_dir):
        model = reward.load_model(model_dir)
        model.config.pad_token_id = 0
        return model

    _assert_same(_loss_and_grads(reward, load, rows, padding_free=True),
                 _loss_and_grads(reward, load, rows, padding_free=False))


def test_dpo_pairs_sharing_their_prompt_give_the_padded_loss_and_gradients():
    """DPO's padding-free pairs lay their shared prompt down once, and where the replies begin alike, their
    first tokens too: the loss, the metrics and every gradient equal the padded batch's."""
    rng = np.random.default_rng(4)
    rows = []
    for prompt_len, alike, a, b, refs in ((6, 0, 4, 7, (-20.0, -21.5)), (3, 2, 5, 3, (-17.0, -15.0))):
        prompt, common = rng.integers(5, 1000, prompt_len), rng.integers(5, 1000, alike)
        chosen, rejected = (np.concatenate([prompt, common, rng.integers(5, 1000, n)]).astype(np.int32) for n in (a, b))
        rows.append({"chosen": chosen, "chosen_start": prompt_len, "rejected": rejected,
                     "rejected_start": prompt_len, "ref_chosen": refs[0], "ref_rejected": refs[1]})
    assert pack_sharing_prefixes([(r["chosen"], r["rejected"]) for r in rows]).contexts is not None
    _assert_same(_loss_and_grads(dpo, dpo.load_model, rows, padding_free=True),
                 _loss_and_grads(dpo, dpo.load_model, rows, padding_free=False))


def _assert_same(got, want) -> None:
    """Two (loss, stats, gradients) of `_loss_and_grads` agree."""
    (loss, stats, grads), (want_loss, want_stats, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for key in want_stats:
        torch.testing.assert_close(stats[key], want_stats[key], rtol=1e-5, atol=1e-5, msg=key)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
