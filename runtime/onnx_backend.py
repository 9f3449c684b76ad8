"""model.onnx in our own loop: numpy + onnxruntime, the KV cache kept as onnxruntime values.

Imports no torch (a laptop needs onnxruntime, numpy and tokenizers only); a test checks it.

The graph (docs/formats.md, "ONNX"): input_ids, attention_mask, position_ids and
past_key_values.{i}.key/.value [1, kv_heads_i, past, head_dim] in; logits and present.{i}.key/.value
[1, kv_heads_i, past+seq, head_dim] out. Every layer's KV-head count is read from the graph's static
input shapes, so irregular models need no config. IO binding keeps the presents as onnxruntime
values that are bound as the next call's pasts: the cache never round-trips through numpy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .backend import Backend, GenerationError, as_id_list, check_continues, read_json

PAST_PATTERN = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    @classmethod
    def import_runtime(cls, threads: int | None = None) -> None:
        import onnxruntime  # noqa: F401

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        spinning: bool | None = None,
        profile_prefix: str | None = None,
    ):
        import onnxruntime as ort

        path = Path(path)
        model_file = path / "model.onnx" if path.is_dir() else path
        if not model_file.is_file():
            raise GenerationError(f"no model.onnx at {path}; give an ONNX variant directory written by effllm-export")
        self.path = model_file
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if profile_prefix:  # onnxruntime's per-node timings (bench/decode_profile.py); end_profiling() writes them
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self._ort = ort

        inputs = {i.name: i for i in self.session.get_inputs()}
        pasts = []
        for name, info in inputs.items():
            match = PAST_PATTERN.match(name)
            if match:
                kv_heads, head_dim = info.shape[1], info.shape[3]
                if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                    raise GenerationError(f"{model_file}: {name} has no static KV-head / head_dim sizes ({info.shape})")
                pasts.append((int(match.group(1)), match.group(2) == "value", name, kv_heads, head_dim))
        pasts.sort()
        self.past_names = [p[2] for p in pasts]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.past_shapes = [(1, p[3], 0, p[4]) for p in pasts]
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in ["logits", *self.present_names] if n not in outputs]
        if "input_ids" not in inputs or missing:
            raise GenerationError(
                f"{model_file} is not an effllm decoder export (needs input_ids, past_key_values.* and logits, "
                f"present.*; missing {missing or ['input_ids']}); re-export it with effllm-export"
            )
        self.has_mask = "attention_mask" in inputs
        self.has_positions = "position_ids" in inputs
        self.vocab_size = self.session.get_outputs()[outputs.index("logits")].shape[-1]
        if not isinstance(self.vocab_size, int):
            self.vocab_size = None

        genai = read_json(model_file.parent / "genai_config.json").get("model", {})
        self.eos_ids = as_id_list(genai.get("eos_token_id"))
        self.bos_id = genai.get("bos_token_id")
        self.max_seq_len = genai.get("context_length")
        self.binding = self.session.io_binding()
        self.past: list = []
        self.position = 0

    def _empty_past(self) -> list:
        return [self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for shape in self.past_shapes]

    def forward_all(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        check_continues(self.position, start_pos)
        if start_pos == 0:
            self.past = self._empty_past()
        n = len(tokens)
        total = start_pos + n
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        if self.has_mask:
            binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if self.has_positions:
            binding.bind_cpu_input("position_ids", np.arange(start_pos, total, dtype=np.int64)[None])
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = list(outputs[1:])
        self.position = total
        return outputs[0].numpy()[0]

    def end_profiling(self) -> Path:
        """Stop onnxruntime's profiler and return its JSON trace (the session must have a profile_prefix)."""
        return Path(self.session.end_profiling())

    def close(self) -> None:
        self.past = []
        self.binding = None
        self.session = None
