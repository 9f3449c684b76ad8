"""Preparing the training data (effllm.data.prepare): sources -> held-out split -> token shards, reused, resumed,
in parallel. Reading them back into batches: test_token_batches.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from effllm.data.prepare import DataError, prepare_tokens

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


def read_all(paths, dtype):
    """The token stream of a list of shards, concatenated."""
    return np.concatenate([np.fromfile(p, dtype=dtype) for p in paths])


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
    train = read_all(info.train_paths, np.uint16)
    held = read_all(info.heldout_paths, np.uint16)
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
    shard_dir = f"tokens-{info.fingerprint}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["heldout.bin", "meta.json", shard_dir]
    # the held-out split also in one file, where effllm-eval and effllm-export look for it
    assert (tmp_path / "out" / "heldout.bin").read_bytes() == held.tobytes() and meta["heldout_tokens"] == len(held)
    assert sorted(p.name for p in (tmp_path / "out" / shard_dir).iterdir()) == [
        "heldout-00000.bin", "meta.json", "train-00000.bin"
    ]

    # deterministic: a second preparation elsewhere writes the same bytes
    again = prepare_tokens([str(tmp_path / "src")], tokenizer, tmp_path / "out2", 0.25, show_progress=False)
    assert [p.read_bytes() for p in again.train_paths] == [p.read_bytes() for p in info.train_paths]
    assert [p.read_bytes() for p in again.heldout_paths] == [p.read_bytes() for p in info.heldout_paths]


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
    assert read_all(info.train_paths, np.uint32).tolist() == [1, 65537, 69999, 0]  # would wrap in uint16
    assert read_all(info.heldout_paths, np.uint32).tolist() == [65535, 65536, 0]


def test_reuse_does_not_rewrite(tmp_path, tokenizer, capsys):
    write_mixed_dir(tmp_path / "src")
    first = prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", 0.25, show_progress=False)
    files = [*first.train_paths, *first.heldout_paths, first.meta_path]
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
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    write_jsonl(tmp_path / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    with pytest.raises(DataError, match="held-out"):  # fails after tokenizing
        prepare_tokens(str(tmp_path / "two.jsonl"), tokenizer, tmp_path / "out", 0.02, show_progress=False)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert all(p.exists() for p in info.train_paths)


def test_hugging_face_dataset_paths(tmp_path, tokenizer):
    import datasets

    repo = tmp_path / "hub_repo"  # a dataset repository laid out as on the Hub, loaded by load_dataset
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", [{"text": d} for d in DOCS])
    write_jsonl(repo / "test.jsonl", [{"text": d.upper()} for d in DOCS[:4]])
    info = prepare_tokens(f"hf:{repo}", tokenizer, tmp_path / "t", 0.5, split="test", show_progress=False)
    eos = tokenizer.eos_token_id
    assert [decode(tokenizer, d) for d in split_docs(read_all(info.heldout_paths, np.uint16), eos)] == [
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
    assert [decode(tokenizer, d) for d in split_docs(read_all(info.train_paths, np.uint16), eos)] == [
        DOCS[0],
        DOCS[2],
    ]


def test_long_documents_are_encoded_in_pieces(tmp_path, tokenizer, monkeypatch):
    import effllm.data.sources as sources

    monkeypatch.setattr(sources, "PIECE_CHARS", 100)  # so that small files take the large-file path
    long_text = "".join(f"line {i} of a long file, with words\n" for i in range(40)) + "no newline at the end " * 9
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(long_text)
    write_jsonl(tmp_path / "src" / "b.jsonl", [{"text": long_text.upper()}, {"text": "short"}])
    info = prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", heldout_fraction=0.5, show_progress=False)
    eos = tokenizer.eos_token_id
    train = [decode(tokenizer, d) for d in split_docs(read_all(info.train_paths, np.uint16), eos)]
    held = [decode(tokenizer, d) for d in split_docs(read_all(info.heldout_paths, np.uint16), eos)]
    assert (train, held) == ([long_text, "short"], [long_text.upper()])  # one eos per document, not per piece



def test_few_long_documents_are_topped_up_to_the_asked_fraction_by_tokens(tmp_path, tokenizer, monkeypatch, capsys):
    """8 long documents and 10% asked: no 10th document exists, so whole documents alone would hold out
    nothing; the split takes pieces of the long documents instead, to the asked share of the text."""
    import effllm.data.heldout as heldout
    import effllm.data.sources as sources

    monkeypatch.setattr(sources, "PIECE_CHARS", 100)
    monkeypatch.setattr(heldout, "TOP_UP_SLACK", 200)
    docs = ["".join(f"doc {d} line {i}: some words here\n" for i in range(100)) for d in range(8)]
    write_jsonl(tmp_path / "long.jsonl", [{"text": d} for d in docs])
    info = prepare_tokens(str(tmp_path / "long.jsonl"), tokenizer, tmp_path / "out", heldout_fraction=0.1,
                          show_progress=False)  # fmt: skip
    eos = tokenizer.eos_token_id
    train = [decode(tokenizer, d) for d in split_docs(read_all(info.train_paths, np.uint16), eos)]
    held = [decode(tokenizer, d) for d in split_docs(read_all(info.heldout_paths, np.uint16), eos)]
    share = info.heldout_tokens / (info.train_tokens + info.heldout_tokens)
    assert 0.08 <= share <= 0.13, share
    assert sum(map(len, train + held)) == sum(map(len, docs)), "every character is in exactly one split"
    assert all(any(h in d for d in docs) for h in held), "held-out parts are contiguous text of one document"
    assert len(held) >= 2, "spread over the corpus, not one block"
    assert "held-out split has only" in capsys.readouterr().out  # far below the tokens a perplexity needs

# ---- data at scale: parallel, sharded, streamed, pre-tokenized, resumable -------------------------
def many_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta tokens shard stream python module function return value".split()
    return [f"Doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(5, 80)))) + "\n" for i in range(n)]


def test_parallel_tokenization_writes_identical_shards(tmp_path, tokenizer):
    docs = many_docs(300)
    write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    one = prepare_tokens(str(tmp_path / "d.jsonl"), tokenizer, tmp_path / "one", 0.1, show_progress=False,
                         shard_chars=4000)  # fmt: skip
    two = prepare_tokens(str(tmp_path / "d.jsonl"), tokenizer, tmp_path / "two", 0.1, show_progress=False,
                         shard_chars=4000, num_proc=2)  # fmt: skip
    assert len(one.train_paths) > 5, "many shards, not one file"
    assert [p.name for p in one.train_paths] == [p.name for p in two.train_paths]
    assert [p.read_bytes() for p in one.train_paths + one.heldout_paths] == [
        p.read_bytes() for p in two.train_paths + two.heldout_paths
    ]
    # the token stream does not depend on the shard size either, and matches the tokenizer's own output
    whole = prepare_tokens(str(tmp_path / "d.jsonl"), tokenizer, tmp_path / "whole", 0.1, show_progress=False)
    assert len(whole.train_paths) == 1
    assert np.array_equal(read_all(whole.train_paths, np.uint16), read_all(two.train_paths, np.uint16))
    eos = tokenizer.eos_token_id
    expect = [tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for i, d in enumerate(docs) if (i + 1) % 10]
    assert read_all(two.train_paths, np.uint16).tolist() == [t for ids in expect for t in ids]
    # a token cap reached while later chunks are already tokenized in parallel: the same as one process
    cap = two.train_tokens // 2
    c1 = prepare_tokens(str(tmp_path / "d.jsonl"), tokenizer, tmp_path / "c1", 0.1, cap, show_progress=False,
                        shard_chars=4000)  # fmt: skip
    c2 = prepare_tokens(str(tmp_path / "d.jsonl"), tokenizer, tmp_path / "c2", 0.1, cap, show_progress=False,
                        shard_chars=4000, num_proc=2)  # fmt: skip
    assert [p.read_bytes() for p in c1.train_paths] == [p.read_bytes() for p in c2.train_paths]
    assert cap <= c2.train_tokens + c2.heldout_tokens < cap + 300  # stops at the end of the document at the cap
    assert sorted(p.name for p in c2.train_paths[0].parent.glob("train-*")) == [p.name for p in c2.train_paths]


def test_one_text_file_is_held_out_from_its_end(tmp_path, tokenizer, capsys):
    text = "".join(f"Line {i}: some text of the only file.\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    info = prepare_tokens(str(tmp_path / "corpus.txt"), tokenizer, tmp_path / "out", 0.05, show_progress=False)
    out = capsys.readouterr().out
    assert "one text file: holding out its last" in out and "(5.0%)" in out
    eos = tokenizer.eos_token_id
    train = decode(tokenizer, split_docs(read_all(info.train_paths, np.uint16), eos)[0])
    held = decode(tokenizer, split_docs(read_all(info.heldout_paths, np.uint16), eos)[0])
    assert train + held == text and held.startswith("Line ") and 0.04 < len(held) / len(text) < 0.06


def test_pre_tokenized_input(tmp_path, tokenizer):
    docs = many_docs(40)
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": x} for x in ids])
    pq.write_table(pa.table({"input_ids": ids}), tmp_path / "ids.parquet")
    write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in docs])
    from_text = prepare_tokens(str(tmp_path / "text.jsonl"), tokenizer, tmp_path / "t", 0.25, show_progress=False)
    for name in ("ids.jsonl", "ids.parquet"):
        info = prepare_tokens(str(tmp_path / name), tokenizer, tmp_path / name.replace(".", "_"), 0.25,
                              text_field="input_ids", show_progress=False)  # fmt: skip
        assert np.array_equal(read_all(info.train_paths, np.uint16), read_all(from_text.train_paths, np.uint16))
        assert np.array_equal(read_all(info.heldout_paths, np.uint16), read_all(from_text.heldout_paths, np.uint16))
    # a directory of shards is used in place, by any number of readers, with no tokenizing
    for where in (tmp_path / "t", from_text.train_paths[0].parent):
        again = prepare_tokens(str(where), tokenizer, tmp_path / "unused", show_progress=False)
        assert again.reused and again.train_paths == from_text.train_paths and not (tmp_path / "unused").exists()
    from effllm.model.tokenizer import train_ascii_bpe

    other = train_ascii_bpe(docs, vocab_size=300)
    with pytest.raises(DataError, match="another tokenizer"):
        prepare_tokens(str(tmp_path / "t"), other, tmp_path / "o", show_progress=False)
    write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 2, 99999]}, {"input_ids": [3]}])
    with pytest.raises(DataError, match="token id 99999"):
        prepare_tokens(str(tmp_path / "bad.jsonl"), tokenizer, tmp_path / "b", 0.5, text_field="input_ids",
                       show_progress=False)  # fmt: skip
    assert not (tmp_path / "b").exists()


MEMORY_PEAKS = """
import json, sys, tracemalloc
from transformers import PreTrainedTokenizerFast
from effllm.data.prepare import prepare_tokens
tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
peaks = []
for path in sys.argv[2:]:
    tracemalloc.start()
    prepare_tokens(path, tok, path + ".out", 0.1, show_progress=False, shard_chars=20_000)
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
print(json.dumps(peaks))
"""


def test_memory_stays_flat_for_a_larger_corpus(tmp_path, tokenizer):
    """Streamed: the peak of Python allocations does not grow with the corpus (4x here). Measured in a
    fresh process, so that nothing left by other tests counts."""
    import subprocess
    import sys

    tokenizer.save_pretrained(tmp_path / "tok")
    paths = []
    for n in (1, 4):
        paths.append(tmp_path / f"c{n}.jsonl")
        with paths[-1].open("w") as f:
            for k in range(n):
                f.writelines(json.dumps({"text": d}) + "\n" for d in many_docs(800, seed=k))
    assert paths[1].stat().st_size > 3.9 * paths[0].stat().st_size > 500_000
    r = subprocess.run([sys.executable, "-c", MEMORY_PEAKS, str(tmp_path / "tok"), *map(str, paths)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    peaks = json.loads(r.stdout.strip().splitlines()[-1])
    assert peaks[1] < 1.3 * peaks[0], peaks  # 4x the corpus, the same peak


KILLED_PREP = """
import sys
from transformers import PreTrainedTokenizerFast
from effllm.data.prepare import prepare_tokens
tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
prepare_tokens(sys.argv[2], tok, sys.argv[3], 0.1, shard_chars=20_000, show_progress=False)
"""


def test_sigkill_during_tokenization_then_resume(tmp_path, tokenizer):
    import signal
    import subprocess
    import sys
    import time

    tokenizer.save_pretrained(tmp_path / "tok")
    with (tmp_path / "big.jsonl").open("w") as f:
        for k in range(10):
            f.writelines(json.dumps({"text": d}) + "\n" for d in many_docs(1000, seed=k))
    args = [str(tmp_path / "tok"), str(tmp_path / "big.jsonl"), str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PREP, *args])
    deadline = time.time() + 120
    while len(list((tmp_path / "out").glob("tokens-*/0*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted((tmp_path / "out").glob("tokens-*/0*.json"))
    assert len(finished) >= 3 and not (tmp_path / "out" / "meta.json").exists(), "killed before the end"
    kept = {p: p.stat().st_mtime_ns for p in finished[0].parent.glob("train-*.bin") if p.with_name(
        p.name.replace("train-", "").replace(".bin", ".json")).exists()}  # fmt: skip
    resumed = prepare_tokens(args[1], tokenizer, args[2], 0.1, shard_chars=20_000, show_progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "finished shards are reused, not redone"
    fresh = prepare_tokens(args[1], tokenizer, tmp_path / "fresh", 0.1, shard_chars=20_000, show_progress=False)
    assert [p.read_bytes() for p in resumed.train_paths + resumed.heldout_paths] == [
        p.read_bytes() for p in fresh.train_paths + fresh.heldout_paths
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "heldout.bin", "meta.json", resumed.train_paths[0].parent.name
    ]
    left = {p.name for p in resumed.train_paths[0].parent.iterdir()} - {p.name for p in resumed.train_paths}
    assert left == {p.name for p in resumed.heldout_paths} | {"meta.json"}, "no markers or half-written files left"


def test_waiting_reader_gets_the_data_once_it_is_written(tmp_path, tokenizer, monkeypatch):
    """DDP ranks other than 0 wait for the files (wait=True), and never tokenize themselves."""
    import threading

    import effllm.data.prepare as data

    monkeypatch.setattr(data, "WAIT_POLL_S", 0.02)
    write_mixed_dir(tmp_path / "src")
    got = {}
    reader = threading.Thread(target=lambda: got.update(info=prepare_tokens(
        str(tmp_path / "src"), tokenizer, tmp_path / "out", 0.25, show_progress=False, wait=True)))  # fmt: skip
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not (tmp_path / "out").exists(), "it waits, and writes nothing"
    info = prepare_tokens(str(tmp_path / "src"), tokenizer, tmp_path / "out", 0.25, show_progress=False)
    reader.join(30)
    assert got["info"].reused and got["info"].train_paths == info.train_paths
