"""Shared fixtures: tiny models and a tokenizer built here, never downloaded."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from effllm import EfficientLLMConfig, EfficientLLMForCausalLM  # noqa: E402

IRREGULAR = dict(num_attention_heads=[4, 0, 2, 6], num_key_value_heads=[2, 0, 1, 3], intermediate_size=[96, 0, 17, 64])


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models run faster on one torch thread than on two contended ones (this machine has 2 cores
    shared with other test processes; oversubscribed threads spin and slow every small op down ~5x).
    The previous count comes back afterwards: later tests compare against other processes bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """one_torch_thread() for a whole test module: pytestmark = pytest.mark.usefixtures(...)."""
    with one_torch_thread():
        yield


def tiny_config(**overrides) -> EfficientLLMConfig:
    fields = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    fields.update(overrides)
    return EfficientLLMConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> EfficientLLMForCausalLM:
    torch.manual_seed(seed)
    model = EfficientLLMForCausalLM(tiny_config(**overrides)).eval()
    # Random norm weights and biases: ones/zeros would hide indexing bugs in pruning and export.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    from effllm.data.corpus import python_docs_corpus

    return python_docs_corpus(include_stdlib=False)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from effllm.model.tokenizer import train_ascii_bpe

    return train_ascii_bpe(corpus, vocab_size=512)
