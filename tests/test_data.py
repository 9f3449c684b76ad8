"""Data pipeline: sources -> token shards -> deterministic, resumable, DDP-sharded batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from effllm.data import DataError, TokenBatches, evaluate_batches, prepare_tokens, unigram_perplexity

DOCS = [
    f"Document {i}: the quick brown fox {'jumps ' * (i % 5)}over the lazy dog.\nLine two of doc {i}." for i in range(12)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_mixed_dir(root):
    """Docs 0..11 spread over a .txt, a .jsonl and a .parquet in a directory tree, plus files to skip."""
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text(DOCS[0])
    (root / "a2.md").write_text(DOCS[1])
    write_jsonl(root / "b" / "c.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS[2:6])] + [{"text": ""}])
    pq.write_table(pa.table({"text": DOCS[6:12], "n": list(range(6))}), root / "d.parquet")
    (root / "notes.csv").write_text("ignored,file\n")
    (root / ".hidden.txt").write_text("hidden files are skipped")
    (root / "empty.txt").write_text("  \n")  # blank: no document


def split_docs(tokens, eos):
    assert tokens[-1] == eos, "every document ends with eos"
    cuts = np.flatnonzero(tokens == eos)
    return [tokens[a + 1 : b] for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


def decode(tokenizer, ids):
    return tokenizer.decode([int(t) for t in ids], clean_up_tokenization_spaces=False)


def test_directory_round_trip_and_heldout_split(tmp_path, tokenizer):
    write_mixed_dir(tmp_path / "src")
    info = prepare_tokens(
        str(tmp_path / "src"), tokenizer, tmp_path / "out", heldout_fraction=0.25, show_progress=False
    )
    assert info.dtype == "uint16" and info.vocab_size == len(tokenizer) == 512
    train = np.fromfile(info.train_path, dtype=np.uint16)
    held = np.fromfile(info.heldout_path, dtype=np.uint16)
    assert (len(train), len(held)) == (info.train_tokens, info.heldout_tokens)
    eos = tokenizer.eos_token_id
    train_docs = [decode(tokenizer, d) for d in split_docs(train, eos)]
    held_docs = [decode(tokenizer, d) for d in split_docs(held, eos)]
    # sorted order a.txt, a2.md, b/c.jsonl, d.parquet; every 4th document held out, whole
    assert held_docs == [DOCS[3], DOCS[7], DOCS[11]]
    assert train_docs == [d for i, d in enumerate(DOCS) if (i + 1) % 4]
    meta = json.loads(info.meta_path.read_text())
    assert meta["train_documents"] == 9 and meta["heldout_documents"] == 3 and meta["eos_token_id"] == eos
    assert len(meta["sources"]) == 5  # the blank .txt is a source that yields no document
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["heldout.bin", "meta.json", "train.bin"]

    # deterministic: a second preparation elsewhere writes the same bytes
    again = prepare_tokens([str(tmp_path / "src")], tokenizer, tmp_path / "out2", 0.25, show_progress=False)
    assert again.train_path.read_bytes() == info.train_path.read_bytes()
    assert again.heldout_path.read_bytes() == info.heldout_path.read_bytes()


def test_uint32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, 70000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w65537 w69999"}, {"text": "w65535 w65536"}])
    info = prepare_tokens(str(tmp_path / "d.jsonl"), tok, tmp_path / "out", heldout_fraction=0.5, show_progress=False)
    assert info.dtype == "uint32" and info.vocab_size == 70000
    assert np.fromfile(info.train_path, np.uint32).tolist() == [1, 65537, 69999, 0]  # would wrap in uint16
    assert np.fromfile(info.heldout_path, np.uint32).tolist() == [65535, 65536, 0]


def test_reuse_does_not_rewrite(tmp_path, tokenizer, capsys):
    write_mixed_dir(tmp_path / "src")
    first = prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", 0.25, show_progress=False)
    files = [first.train_path, first.heldout_path, first.meta_path]
    stamps = [p.stat().st_mtime_ns for p in files]
    capsys.readouterr()
    second = prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", 0.25, show_progress=True)
    assert second.reused and not first.reused and "reusing" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert (second.train_tokens, second.heldout_tokens) == (first.train_tokens, first.heldout_tokens)
    # a changed source, or a different held-out fraction, means new data
    (tmp_path / "src" / "a.txt").write_text(DOCS[0] + " more")
    third = prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", 0.25, show_progress=False)
    assert not third.reused and third.train_tokens > first.train_tokens
    assert not prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", 0.5, show_progress=False).reused


def _bad_inputs(tmp):
    (tmp / "nothing").mkdir()
    (tmp / "nothing" / "x.csv").write_text("a,b\n")
    (tmp / "empty").mkdir()
    (tmp / "empty" / "e.txt").write_text("")
    (tmp / "empty" / "e.jsonl").write_text("\n")
    write_jsonl(tmp / "body.jsonl", [{"body": "x", "title": "y"}])
    pq.write_table(pa.table({"content": ["x"]}), tmp / "content.parquet")
    write_jsonl(tmp / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    return {
        "missing": (str(tmp / "missing.txt"), "does not exist"),
        "no-files": (str(tmp / "nothing"), "holds no"),
        "empty": (str(tmp / "empty"), "no text found"),
        "jsonl-field": (str(tmp / "body.jsonl"), "'body', 'title'"),
        "parquet-field": (str(tmp / "content.parquet"), "'content'"),
        "unknown-id": ("nobody-xyz/no-such-dataset", "Hugging Face dataset"),
        "heldout-empty": (str(tmp / "two.jsonl"), "held-out split would be empty"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "no-files", "empty", "jsonl-field", "parquet-field", "unknown-id", "heldout-empty"]
)
def test_bad_input_raises_one_line_and_writes_nothing(tmp_path, tokenizer, case):
    data, phrase = _bad_inputs(tmp_path)[case]
    out = tmp_path / "new" / "out"
    with pytest.raises(DataError) as err:
        prepare_tokens(data, tokenizer, out, show_progress=False)
    assert phrase in str(err.value) and "\n" not in str(err.value) and isinstance(err.value, ValueError)
    assert not (tmp_path / "new").exists()


def test_failure_leaves_existing_data_untouched(tmp_path, tokenizer):
    write_mixed_dir(tmp_path / "src")
    info = prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", 0.25, show_progress=False)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir()}
    write_jsonl(tmp_path / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    with pytest.raises(DataError, match="held-out"):  # fails after tokenizing
        prepare_tokens(str(tmp_path / "two.jsonl"), tokenizer, tmp_path / "out", 0.02, show_progress=False)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir()} == before
    assert info.train_path.exists()


def test_hugging_face_dataset_paths(tmp_path, tokenizer):
    import datasets

    repo = tmp_path / "hub_repo"  # a dataset repository laid out as on the Hub, loaded by load_dataset
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", [{"text": d} for d in DOCS])
    write_jsonl(repo / "test.jsonl", [{"text": d.upper()} for d in DOCS[:4]])
    info = prepare_tokens(f"hf:{repo}", tokenizer, tmp_path / "t", 0.5, split="test", show_progress=False)
    eos = tokenizer.eos_token_id
    assert [decode(tokenizer, d) for d in split_docs(np.fromfile(info.heldout_path, np.uint16), eos)] == [
        DOCS[1].upper(),
        DOCS[3].upper(),
    ]
    # max_tokens caps a stream at the first document end at or after it
    sizes = np.cumsum([len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in DOCS])
    cap = int(sizes[2]) - 3
    capped = prepare_tokens(f"hf:{repo}", tokenizer, tmp_path / "c", 0.5, max_tokens=cap, show_progress=False)
    assert capped.train_tokens + capped.heldout_tokens == sizes[2]
    with pytest.raises(DataError, match="field 'body'"):
        prepare_tokens(f"hf:{repo}", tokenizer, tmp_path / "b", text_field="body", show_progress=False)
    with pytest.raises(DataError, match="validation"):
        prepare_tokens(f"hf:{repo}", tokenizer, tmp_path / "v", split="validation", show_progress=False)

    saved = tmp_path / "saved"  # a DatasetDict.save_to_disk directory is read with load_from_disk
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:4]})}).save_to_disk(str(saved))
    info = prepare_tokens(str(saved), tokenizer, tmp_path / "s", 0.5, show_progress=False)
    assert [decode(tokenizer, d) for d in split_docs(np.fromfile(info.train_path, np.uint16), eos)] == [
        DOCS[0],
        DOCS[2],
    ]


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


def test_long_documents_are_encoded_in_pieces(tmp_path, tokenizer, monkeypatch):
    import effllm.data_sources as sources

    monkeypatch.setattr(sources, "PIECE_CHARS", 100)  # so that small files take the large-file path
    long_text = "".join(f"line {i} of a long file, with words\n" for i in range(40)) + "no newline at the end " * 9
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(long_text)
    write_jsonl(tmp_path / "src" / "b.jsonl", [{"text": long_text.upper()}, {"text": "short"}])
    info = prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", heldout_fraction=0.5, show_progress=False)
    eos = tokenizer.eos_token_id
    train = [decode(tokenizer, d) for d in split_docs(np.fromfile(info.train_path, np.uint16), eos)]
    held = [decode(tokenizer, d) for d in split_docs(np.fromfile(info.heldout_path, np.uint16), eos)]
    assert (train, held) == ([long_text, "short"], [long_text.upper()])  # one eos per document, not per piece
