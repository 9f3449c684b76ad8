"""Reading token shards (effllm.data.token_batches): windows, epochs, resume, DDP ranks, held-out batches,
the unigram baseline, and independence from how the stream is sharded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from effllm.data.prepare import DataError, prepare_tokens
from effllm.data.token_batches import TokenBatches, evaluate_batches, unigram_perplexity


def synthetic(tmp_path, n_tokens, name="tokens.bin"):
    """Token i has value i, so every window names its own position."""
    path = tmp_path / name
    np.arange(n_tokens, dtype=np.uint32).tofile(path)
    return path


def windows_of(batch, seq_len):
    rows = batch.numpy()
    assert np.all(rows == rows[:, :1] + np.arange(seq_len + 1)), "each row is one contiguous window"
    assert np.all(rows[:, 0] % seq_len == 0)
    return (rows[:, 0] // seq_len).tolist()


def test_stream_windows_epochs_and_determinism(tmp_path):
    path = synthetic(tmp_path, 12 * 4 + 1)  # 12 windows of seq_len 4 (+1 label token)
    stream = TokenBatches(path, "uint32", seq_len=4, batch_size=3, seed=7)
    assert stream.tokens_per_batch == 12 and stream.n_windows == 12
    batches = [stream.next_batch() for _ in range(8)]
    assert all(b.dtype == torch.int64 and b.shape == (3, 5) for b in batches)
    seen = [w for b in batches for w in windows_of(b, 4)]
    assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:]) == list(range(12))  # each epoch: all, once
    assert seen[:12] != seen[12:]  # reshuffled
    same = TokenBatches(path, "uint32", seq_len=4, batch_size=3, seed=7)
    assert all(torch.equal(b, same.next_batch()) for b in batches)
    other = TokenBatches(path, "uint32", seq_len=4, batch_size=3, seed=8)
    assert not all(torch.equal(b, other.next_batch()) for b in batches)
    with pytest.raises(DataError, match="fewer than one window"):
        TokenBatches(synthetic(tmp_path, 4, "tiny.bin"), "uint32", seq_len=4, batch_size=1)


@pytest.mark.parametrize("k", [0, 2, 3, 5])
def test_resume_is_exact_across_epochs(tmp_path, k):
    path = synthetic(tmp_path, 10 * 4 + 3)  # 10 windows: batches of 3 straddle epoch ends
    reference = TokenBatches(path, "uint32", seq_len=4, batch_size=3, seed=1)
    expected = [reference.next_batch() for _ in range(k + 6)]
    first = TokenBatches(path, "uint32", seq_len=4, batch_size=3, seed=1)
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TokenBatches(path, "uint32", seq_len=4, batch_size=3, seed=123)  # the state brings the seed
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), e) for e in expected[k:])
    with pytest.raises(DataError, match="same data and seq_len"):
        TokenBatches(path, "uint32", seq_len=5, batch_size=3).load_state_dict(state)


def test_ddp_ranks_split_the_global_batch(tmp_path):
    path = synthetic(tmp_path, 11 * 4 + 1)  # 11 windows, global batch 4: epoch ends mid-batch
    single = TokenBatches(path, "uint32", seq_len=4, batch_size=4, seed=3)
    ranks = [TokenBatches(path, "uint32", seq_len=4, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(7):
        whole = windows_of(single.next_batch(), 4)
        parts = [windows_of(s.next_batch(), 4) for s in ranks]
        assert set(parts[0]).isdisjoint(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(whole)
        assert parts == [whole[0::2], whole[1::2]]
    assert ranks[0].state_dict() == ranks[1].state_dict()
    assert ranks[0].state_dict()["position"] == single.state_dict()["position"]


def test_evaluate_batches_in_order(tmp_path):
    path = synthetic(tmp_path, 10 * 8 + 5)  # 10 windows of seq_len 8, a 4-token tail dropped
    batches = list(evaluate_batches(path, "uint32", 8, batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 2] and all(b.shape[1] == 9 for b in batches)
    assert [w for b in batches for w in windows_of(b, 8)] == list(range(10))
    assert sum(b.shape[0] for b in evaluate_batches(path, "uint32", 8, max_windows=5, batch_size=4)) == 5
    with pytest.raises(DataError):
        evaluate_batches(path, "uint32", 100)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the corpus reads typing.io docstrings
def test_unigram_perplexity(tmp_path, tokenizer):
    info = prepare_tokens(None, tokenizer, tmp_path / "corpus", show_progress=False)  # the embedded corpus
    ppl = unigram_perplexity(info.train_path, info.heldout_path, info.dtype, info.vocab_size)
    assert 1.0 < ppl < 0.5 * info.vocab_size  # real text is far from uniform
    # a train split holding every token equally often gives the uniform model: perplexity == vocab size
    uniform = tmp_path / "uniform.bin"
    np.tile(np.arange(info.vocab_size, dtype=np.uint16), 3).tofile(uniform)
    ppl = unigram_perplexity(uniform, info.heldout_path, info.dtype, info.vocab_size)
    assert ppl == pytest.approx(info.vocab_size, rel=1e-9)
    # hand-computed: counts+1 = [4, 2, 1, 1] / 8; held-out [0, 1] -> exp(-(ln 1/2 + ln 1/4) / 2) = sqrt(8)
    np.array([0, 0, 0, 1], np.uint16).tofile(tmp_path / "t.bin")
    np.array([0, 1], np.uint16).tofile(tmp_path / "h.bin")
    assert unigram_perplexity(tmp_path / "t.bin", tmp_path / "h.bin", "uint16", 4) == pytest.approx(math.sqrt(8))


def test_batches_do_not_depend_on_sharding(tmp_path):
    path = synthetic(tmp_path, 10 * 8 + 3)
    tokens = np.fromfile(path, np.uint32)
    cuts = [0, 7, 7, 30, 31, 64, len(tokens)]  # an empty shard, windows across shard ends
    shards = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        shards.append(tmp_path / f"s{i}.bin")
        tokens[a:b].tofile(shards[-1])
    one = TokenBatches(path, "uint32", seq_len=8, batch_size=3, seed=4)
    many = TokenBatches(shards, "uint32", seq_len=8, batch_size=3, seed=4)
    assert one.n_windows == many.n_windows == 10
    for _ in range(9):
        assert torch.equal(one.next_batch(), many.next_batch())
    assert [torch.equal(a, b) for a, b in zip(evaluate_batches(path, "uint32", 8), evaluate_batches(shards, "uint32", 8))]
    assert unigram_perplexity(path, shards, "uint32", 90) == unigram_perplexity(path, path, "uint32", 90)
