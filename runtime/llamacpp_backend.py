"""model.gguf in llama.cpp, through llama-cpp-python's ctypes bindings of its C API (no torch).

We drive llama.h's functions ourselves (model, context, batch, logits) rather than llama-cpp-python's
high-level Llama class, because verification needs every position's logits and a cache that continues
at start_pos. The KV cache is llama.cpp's own (one sequence); ``start_pos == 0`` clears it.

Any GGUF file runs, whatever its name or writer: :class:`GgufTokenizer` is the tokenizer inside it (for files
without effllm's tokenizer.json beside them), through llama.cpp's own tokenize / token_to_piece.

The cache type: llama.cpp's default is F16 (what laptop users run: ollama, LM Studio), which moves logits
by about 1e-3; ``kv_cache="f32"`` matches torch to ~1e-5 and is what export verification uses.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import Backend, GenerationError, check_continues
from .native import quiet_native_output

GGUF_FILE = "model.gguf"
KV_CACHE_TYPES = {"f16": 1, "f32": 0}  # ggml_type values of the KV cache
_log: dict = {"errors": []}  # the log callback (must outlive every call into llama.cpp), llama.cpp's errors
MAX_ERRORS = 16


def llama_api():
    """llama-cpp-python's low-level module, initialised once; llama.cpp's log goes nowhere but its last error."""
    import llama_cpp

    if "callback" not in _log:
        # llama.cpp logs every load and every quantized tensor to stderr; effllm's commands print their own
        # lines, and quote llama.cpp's first error when something fails.
        def keep_errors(level, text, _user):
            if level == 4 and text and len(_log["errors"]) < MAX_ERRORS:  # GGML_LOG_LEVEL_ERROR
                _log["errors"].append(text.decode("utf-8", "replace").strip())

        _log["callback"] = llama_cpp.llama_log_callback(keep_errors)
        llama_cpp.llama_log_set(_log["callback"], ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def clear_errors() -> None:
    """Forget llama.cpp's earlier errors: call before the call whose failure first_error() should explain."""
    _log["errors"] = []


def first_error() -> str:
    """llama.cpp's first error since clear_errors() (one line): the cause, where later lines only say that
    the load failed ("check_tensor_dims: tensor 'blk.1.attn_q.weight' has wrong shape" before "failed to load
    model")."""
    return _log["errors"][0] if _log["errors"] else "no reason logged"


class LlamaCppBackend(Backend):
    name = "llamacpp"

    @classmethod
    def import_runtime(cls, threads: int | None = None) -> None:
        llama_api()

    def __init__(
        self, path: str | Path, threads: int | None = None, kv_cache: str = "f16", extra_buffers: bool = False
    ):
        self.model = self.ctx = self.batch = None
        path = Path(path)
        model_file = path / GGUF_FILE if path.is_dir() else path
        if not model_file.is_file():
            raise GenerationError(
                f"no {GGUF_FILE} at {path}; give a .gguf file or a GGUF variant directory written by effllm-export"
            )
        if kv_cache not in KV_CACHE_TYPES:
            raise GenerationError(f"unknown KV cache type {kv_cache!r}; choose one of {', '.join(KV_CACHE_TYPES)}")
        self.path = model_file
        self._api = api = llama_api()
        model_params = api.llama_model_default_params()
        # No extra CPU buffer types (AMX / repacked weights): on this project's machines the CPU reports AMX, and
        # llama.cpp's AMX kernels die there with SIGILL on the first quantized matmul (measured on Q8_0).
        model_params.use_extra_bufts = extra_buffers
        clear_errors()
        with quiet_native_output():
            self.model = api.llama_model_load_from_file(str(model_file).encode(), model_params)
        if not self.model:
            raise GenerationError(f"llama.cpp cannot load {model_file}: {first_error()}")
        self.vocab = api.llama_model_get_vocab(self.model)
        self.vocab_size = int(api.llama_vocab_n_tokens(self.vocab))
        self.max_seq_len = int(api.llama_model_n_ctx_train(self.model))
        self.bos_id = _token_or_none(api.llama_vocab_bos(self.vocab))
        self.eos_ids = tuple(t for t in (_token_or_none(api.llama_vocab_eos(self.vocab)),) if t is not None)

        params = api.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.max_seq_len  # a whole prompt in one call
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = int(threads or os.cpu_count() or 1)
        params.type_k = params.type_v = KV_CACHE_TYPES[kv_cache]
        params.flash_attn_type = 0  # off: the plain attention path, exact with an F32 cache
        params.no_perf = True
        clear_errors()
        with quiet_native_output():
            self.ctx = api.llama_init_from_model(self.model, params)
        if not self.ctx:
            self.close()
            raise GenerationError(f"llama.cpp cannot create a context for {model_file}: {first_error()}")
        self.batch = api.llama_batch_init(self.max_seq_len, 0, 1)
        self.position = 0

    def forward_all(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        check_continues(self.position, start_pos)
        n = len(tokens)
        if start_pos + n > self.max_seq_len:
            raise GenerationError(f"{start_pos + n} positions exceed the model's context of {self.max_seq_len}")
        api = self._api
        if start_pos == 0:
            api.llama_memory_clear(api.llama_get_memory(self.ctx), True)
        batch = self.batch
        batch.n_tokens = n
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1  # every position's logits (forward_all's contract)
        clear_errors()
        code = api.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code}: {first_error()}")
        self.position = start_pos + n
        logits = api.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(logits, shape=(n, self.vocab_size)).copy()

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """llama.cpp's own token ids for ``text`` (special tokens not parsed); add_special: the BOS/EOS the
        file asks for (tokenizer.ggml.add_bos_token), as llama.cpp's tools add them to a prompt."""
        data = text.encode("utf-8")
        room = len(data) + 8  # byte-level BPE: at most one token per byte (+ BOS/EOS)
        ids = (ctypes.c_int32 * room)()
        n = self._api.llama_tokenize(self.vocab, data, len(data), ids, room, add_special, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens, had room for {room}")
        return list(ids[:n])

    def close(self) -> None:
        api = getattr(self, "_api", None)
        if api is None:
            return
        if self.batch is not None:
            api.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            api.llama_free(self.ctx)
        if self.model:
            api.llama_model_free(self.model)
        self.ctx = self.model = None


@dataclass
class Encoding:
    ids: list[int]


class GgufTokenizer:
    """The tokenizer inside a GGUF file, with what the generator uses of tokenizers.Tokenizer (encode().ids,
    decode): llama.cpp tokenizes and detokenizes, so a foreign file's text is what llama.cpp would make of it."""

    def __init__(self, backend: LlamaCppBackend):
        self.backend = backend

    def encode(self, text: str) -> Encoding:
        return Encoding(self.backend.tokenize(text, add_special=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        api, vocab = self.backend._api, self.backend.vocab
        buffer = ctypes.create_string_buffer(256)
        pieces = []
        for token in ids:
            n = api.llama_token_to_piece(vocab, int(token), buffer, len(buffer), 0, not skip_special_tokens)
            if n < 0:
                raise RuntimeError(f"llama_token_to_piece needs {-n} bytes for token {token}")
            pieces.append(buffer.raw[:n])
        # bytes joined first: a character split between tokens decodes whole (a cut one as U+FFFD, for now)
        return b"".join(pieces).decode("utf-8", "replace")


def _token_or_none(token: int) -> int | None:
    return None if token < 0 else int(token)
