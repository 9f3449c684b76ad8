"""The model directory in eager PyTorch, with the model's own KV cache (transformers' DynamicCache).

The reference the exported backends are compared with. Loads any causal LM transformers can load
(importing effllm registers the EfficientLLM classes, so irregular models need no trust_remote_code)
in float32, and keeps only the last position's logits (``logits_to_keep=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .generate import Backend, GenerationError, as_id_list


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, path: str | Path, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.cache_utils import DynamicCache

        from effllm import EfficientLLMForCausalLM  # noqa: F401  (registers the classes with the Auto classes)

        if threads:
            torch.set_num_threads(int(threads))
        path = Path(path)
        if not (path / "config.json").is_file():
            raise GenerationError(f"{path} is not a model directory (no config.json)")
        self.path = path
        self._torch = torch
        self._cache_class = DynamicCache
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
        config = self.model.config
        self.eos_ids = as_id_list(config.eos_token_id)
        self.bos_id = config.bos_token_id
        self.vocab_size = config.vocab_size
        self.max_seq_len = getattr(config, "max_position_embeddings", None)
        self.cache = None
        self.position = 0

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        torch = self._torch
        if start_pos == 0:
            self.cache = self._cache_class()
            self.position = 0
        elif start_pos != self.position:
            raise GenerationError(f"the cache holds {self.position} positions; cannot continue at {start_pos}")
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([list(tokens)], dtype=torch.long),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.position = start_pos + len(tokens)
        return out.logits[0, -1].float().numpy()

    def close(self) -> None:
        self.cache = None
        self.model = None
