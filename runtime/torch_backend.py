"""The model in eager PyTorch, with a transformers DynamicCache as its KV cache.

The reference the exported backends are compared with (effllm-generate's torch backend, and the
torch side of effllm-export's verification, which wraps the in-memory model with ``from_model``).
Loads an effllm model directory with effllm's installed classes, or any architecture transformers
ships, in float32; never with a directory's own code (effllm.model.model_dir).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .backend import Backend, GenerationError, as_id_list, check_continues


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def import_runtime(cls, threads: int | None = None) -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from effllm import EfficientLLMForCausalLM  # noqa: F401

    def __init__(self, path: str | Path, threads: int | None = None):
        import torch

        from effllm.model.model_dir import load_model

        if threads:
            torch.set_num_threads(int(threads))
        path = Path(path)
        if not (path / "config.json").is_file():
            raise GenerationError(f"{path} is not a model directory (no config.json)")
        self._attach(load_model(path, dtype=torch.float32), path)

    @classmethod
    def from_model(cls, model, path: str | Path = "<in memory>") -> TorchBackend:
        """A backend on a model already in memory (turned to float32 and eval mode)."""
        backend = cls.__new__(cls)
        backend._attach(model.float(), Path(path))
        return backend

    def _attach(self, model, path: Path) -> None:
        import torch
        from transformers.cache_utils import DynamicCache

        self.path = path
        self._torch = torch
        self._cache_class = DynamicCache
        self.model = model.eval().requires_grad_(False)
        config = self.model.config
        self.eos_ids = as_id_list(config.eos_token_id)
        self.bos_id = config.bos_token_id
        self.vocab_size = config.vocab_size
        self.max_seq_len = getattr(config, "max_position_embeddings", None)
        self.cache = None
        self.position = 0

    def _run(self, tokens: Sequence[int], start_pos: int, keep: int):
        torch = self._torch
        check_continues(self.position, start_pos)
        if start_pos == 0:
            self.cache = self._cache_class()
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([list(tokens)], dtype=torch.long),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        self.position = start_pos + len(tokens)
        return out.logits[0].float().numpy()

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        return self._run(tokens, start_pos, keep=1)[-1]  # only the last position through the output layer

    def forward_all(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        return self._run(tokens, start_pos, keep=0)

    def close(self) -> None:
        self.cache = None
        self.model = None
