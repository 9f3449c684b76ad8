"""An exported ONNX directory in onnxruntime-genai: its model runner and KV cache, our sampling.

onnxruntime-genai runs the directory effllm-export writes as is (genai_config.json beside model.onnx;
version 0.18 reads each layer's KV-head count from the graph). We feed it tokens with
``append_tokens`` and read the last position's logits with ``get_logits``; the next token is chosen
by effllm.runtime.sampling like every other backend's, so the same seed gives the same tokens.
Imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .backend import Backend, GenerationError, as_id_list, read_json


class GenaiBackend(Backend):
    name = "genai"

    @classmethod
    def import_runtime(cls, threads: int | None = None) -> None:
        import onnxruntime_genai  # noqa: F401

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime_genai as og

        path = Path(path)
        model_dir = path.parent if path.is_file() else path
        if not (model_dir / "genai_config.json").is_file():
            raise GenerationError(
                f"no genai_config.json in {model_dir}; onnxruntime-genai needs the directory effllm-export writes"
            )
        self.path = model_dir
        self._og = og
        config = og.Config(str(model_dir))
        if threads:
            session = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.model = og.Model(config)
        genai = read_json(model_dir / "genai_config.json").get("model", {})
        self.eos_ids = as_id_list(genai.get("eos_token_id"))
        self.bos_id = genai.get("bos_token_id")
        self.vocab_size = genai.get("vocab_size")
        self.max_seq_len = int(genai.get("context_length") or 2048)
        self.generator = None
        self.position = 0

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        if start_pos == 0:
            params = self._og.GeneratorParams(self.model)
            params.set_search_options(max_length=self.max_seq_len, do_sample=False)
            self.generator = self._og.Generator(self.model, params)
            self.position = 0
        elif start_pos != self.position or self.generator is None:
            raise GenerationError(f"the cache holds {self.position} positions; cannot continue at {start_pos}")
        self.generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        self.position = start_pos + len(tokens)
        return self.generator.get_logits()[0, -1]

    def search_greedy(self, prompt: Sequence[int], new_tokens: int) -> list[int]:
        """New tokens from onnxruntime-genai's own greedy search (it stops early at EOS, without it)."""
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(list(prompt))
        while not generator.is_done():
            generator.generate_next_token()
        self.generator, self.position = None, 0  # forward starts over after this
        return [int(t) for t in generator.get_sequence(0)][len(prompt) :]

    def close(self) -> None:
        self.generator = None
        self.model = None


def genai_greedy(onnx_dir: str | Path, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """New tokens from onnxruntime-genai's greedy search on an ONNX directory (stops early at EOS)."""
    backend = GenaiBackend(onnx_dir)
    try:
        return backend.search_greedy(prompt, new_tokens)
    finally:
        backend.close()
