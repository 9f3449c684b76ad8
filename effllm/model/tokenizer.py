"""Train a small byte-level BPE tokenizer (the quickstart's, and the tests').

Its vocabulary decodes to ASCII only: the initial alphabet is printable ASCII plus ByteLevel's
space and newline symbols. ExecuTorch's TextLLMRunner streams each token through a Python
callback that raises UnicodeDecodeError on a token that is not valid UTF-8 by itself (a byte-level
piece of a multi-byte character), which an ASCII vocabulary can never produce. Non-ASCII input still encodes, through the byte fallback
pieces that ByteLevel adds for unseen bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# ByteLevel maps printable ASCII to itself, space to 'Ġ' and newline to 'Ċ'.
ASCII_ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + ["Ġ", "Ċ"]


def train_ascii_bpe(texts: Iterable[str], vocab_size: int = 1024):
    """A transformers PreTrainedTokenizerFast trained on ``texts``; token 0 is <|endoftext|> (bos = eos)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=ASCII_ALPHABET,
        limit_alphabet=len(ASCII_ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator((t.encode("ascii", "ignore").decode() for t in texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=1 << 20
    )
