"""The shared sampler, streaming text decoding, and the generation loop, on fixed logits (no runtime needed)."""

from __future__ import annotations

import numpy as np
import pytest
from effllm.runtime.generate import Backend, GenerationError, StreamDecoder, TextGenerator
from effllm.runtime.sampling import GREEDY, Sampler, SamplingConfig, SamplingError


def fixed_logits(steps: int = 40, vocab: int = 50, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 2, vocab).astype(np.float32) for _ in range(steps)]


def draw(config: SamplingConfig, logits: list[np.ndarray]) -> list[int]:
    sampler = Sampler(config)
    return [sampler(x) for x in logits]


# ---- the sampler ------------------------------------------------------------------------------------
def test_greedy_is_argmax_and_takes_the_first_of_ties():
    logits = fixed_logits()
    assert draw(GREEDY, logits) == [int(np.argmax(x)) for x in logits]
    assert Sampler(GREEDY)(np.array([1.0, 3.0, 3.0, 0.0])) == 1
    # top_k == 1 is greedy whatever the temperature or seed
    assert draw(SamplingConfig(temperature=2.0, top_k=1, seed=5), logits) == draw(GREEDY, logits)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = fixed_logits()
    config = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    first = draw(config, logits)
    assert draw(config, logits) == first  # same seed, same logits -> same tokens
    assert draw(SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, seed=1235), logits) != first
    assert len(set(first)) > 5  # it does sample, not collapse to greedy


def test_sampling_is_a_function_of_the_logit_values_only():
    """Identical logits from two backends (float32 vs float64 arrays, copies) give identical tokens."""
    logits = fixed_logits()
    config = SamplingConfig(temperature=0.7, top_p=0.8, seed=7)
    as64 = [x.astype(np.float64) for x in logits]
    as2d = [x[None, :].copy() for x in logits]
    assert draw(config, logits) == draw(config, as64) == draw(config, as2d)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    ids, probs = Sampler(SamplingConfig(temperature=1.0, top_k=2)).distribution(logits)
    assert ids.tolist() == [1, 3]
    np.testing.assert_allclose(probs, [0.4 / 0.7, 0.3 / 0.7])
    ids, probs = Sampler(SamplingConfig(temperature=1.0, top_p=0.75)).distribution(logits)
    assert ids.tolist() == [1, 3, 4]  # 0.4 + 0.3 = 0.7 < 0.75, adding 0.15 reaches it
    np.testing.assert_allclose(probs.sum(), 1.0)
    ids, _ = Sampler(SamplingConfig(temperature=1.0, top_p=0.01)).distribution(logits)
    assert ids.tolist() == [1]  # never empty
    # ties at the k-th place are broken by token id, as the stable sort orders them
    ids, _ = Sampler(SamplingConfig(temperature=1.0, top_k=2)).distribution(np.array([0.0, 1.0, 0.5, 1.0, 0.5]))
    assert ids.tolist() == [1, 3]
    ids, _ = Sampler(SamplingConfig(temperature=1.0, top_k=3)).distribution(np.array([0.0, 1.0, 0.5, 1.0, 0.5]))
    assert ids.tolist() == [1, 3, 2]


def test_temperature_scales_the_distribution():
    logits = np.array([2.0, 1.0, 0.0])
    _, cold = Sampler(SamplingConfig(temperature=0.5)).distribution(logits)
    _, hot = Sampler(SamplingConfig(temperature=2.0)).distribution(logits)
    expected = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    np.testing.assert_allclose(cold, expected)
    assert cold[0] > hot[0]


def test_draws_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-3), "top-k"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_options_are_refused_with_a_message(kwargs, word):
    with pytest.raises(SamplingError, match=word):
        SamplingConfig(**kwargs)


# ---- streaming text ------------------------------------------------------------------------------------
def test_stream_pieces_concatenate_to_the_full_decode(tokenizer):
    tok = tokenizer.backend_tokenizer  # the tokenizers.Tokenizer that the runtime uses
    texts = ["The return statement leaves a function.", "a\n\n  b\tc(x) -> [1, 2]"]
    rng = np.random.default_rng(0)
    sequences = [tok.encode(t).ids for t in texts] + [rng.integers(0, tok.get_vocab_size(), 60).tolist()]
    for ids in sequences:
        decoder = StreamDecoder(tok)
        pieces = [decoder.push(t) for t in ids] + [decoder.finish()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def byte_level_tokenizer():
    """A byte-level BPE with the full byte alphabet: non-ASCII characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["plain ascii text, and more plain text"] * 5, trainer)
    return tok


def test_multibyte_characters_are_held_back_until_complete():
    tok = byte_level_tokenizer()
    text = "é✓ naïve 日本"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters span several byte-level tokens
    assert "\ufffd" in tok.decode(ids[:1])  # one byte of 'é' alone is not text
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.finish() == text


# ---- the generation loop, on a backend that returns fixed logits --------------------------------------
class TableBackend(Backend):
    """Logits that depend only on (position, last token): two instances are two 'runtimes' that agree."""

    def __init__(self, name="table", vocab=64, max_seq_len=40, eos=(0,)):
        self.name = name
        self.vocab_size = vocab
        self.max_seq_len = max_seq_len
        self.eos_ids = tuple(eos)
        self.bos_id = 1
        self.calls: list[tuple[list[int], int]] = []
        self.position = 0

    def forward(self, tokens, start_pos):
        assert start_pos == 0 or start_pos == self.position
        self.calls.append((list(tokens), start_pos))
        self.position = start_pos + len(tokens)
        rng = np.random.default_rng(1000 * self.position + int(tokens[-1]))
        logits = rng.normal(0, 3, self.vocab_size).astype(np.float32)
        logits[0] -= 5.0  # EOS rarely, so sequences are long enough to compare
        return logits


class Ids:
    """A tokenizer stand-in: token i is the letter chr(ord('a') + i % 26)."""

    def encode(self, text):
        class E:
            ids = [ord(c) % 60 + 2 for c in text]

        return E()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i == 0))


def test_seeded_generation_is_identical_across_backends_with_identical_logits():
    config = SamplingConfig(temperature=0.8, top_k=30, top_p=0.95, seed=99)
    a = TextGenerator(TableBackend("a"), Ids()).generate("hello", 20, config, stop_at_eos=False)
    b = TextGenerator(TableBackend("b"), Ids()).generate("hello", 20, config, stop_at_eos=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    again = TextGenerator(TableBackend("a"), Ids()).generate("hello", 20, config, stop_at_eos=False)
    assert again.token_ids == a.token_ids


def test_the_loop_prefills_once_then_decodes_one_token_per_step():
    backend = TableBackend()
    gen = TextGenerator(backend, Ids())
    out = gen.generate("abc", 5, stop_at_eos=False)
    assert [len(t) for t, _ in backend.calls] == [3, 1, 1, 1, 1]  # the last token needs no forward
    assert [p for _, p in backend.calls] == [0, 3, 4, 5, 6]
    assert [t[0] for t, _ in backend.calls[1:]] == out.token_ids[:-1]
    assert out.stats.prompt_tokens == 3 and out.stats.new_tokens == 5 and out.stats.stop_reason == "max_new_tokens"
    assert out.text == Ids().decode(out.token_ids)


def test_eos_stops_and_is_not_emitted():
    backend = TableBackend()
    gen = TextGenerator(backend, Ids())
    greedy_free = gen.generate("abc", 30, stop_at_eos=False).token_ids
    eos = greedy_free[4]
    stopped = TextGenerator(TableBackend(eos=(eos,)), Ids()).generate("abc", 30)
    assert stopped.token_ids == greedy_free[: greedy_free.index(eos)]
    assert stopped.stats.stop_reason == "eos"


def test_streaming_matches_generate_and_the_context_limit_cuts():
    gen = TextGenerator(TableBackend(max_seq_len=12), Ids())
    pieces = list(gen.stream("abcd", 100, stop_at_eos=False))
    assert gen.stats.new_tokens == 8 and gen.stats.stop_reason == "context"
    assert "".join(pieces) == gen.generate("abcd", 100, stop_at_eos=False).text


def test_prompt_too_long_and_empty_prompt():
    gen = TextGenerator(TableBackend(max_seq_len=4), Ids())
    with pytest.raises(GenerationError, match="prompt has 5 tokens"):
        gen.generate("abcde", 3)
    backend = TableBackend()
    TextGenerator(backend, Ids()).generate("", 2, stop_at_eos=False)
    assert backend.calls[0] == ([1], 0)  # an empty prompt starts from BOS
