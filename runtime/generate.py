"""One generator over every backend: load a backend, sample, stream text.

A backend (:mod:`effllm.runtime.backend`) is anything with ``forward(tokens, start_pos) -> logits of
the last position``: it owns its KV cache, ``start_pos == 0`` starts a new sequence. The loop around
it (prefill, sampling with :mod:`effllm.runtime.sampling`, EOS, streaming, timing) is written once, here:

    torch              the model directory, eager PyTorch with the model's own KV cache
    onnxruntime        model.onnx in our own numpy + onnxruntime loop (IO binding); imports no torch
    genai              the same directory in onnxruntime-genai (its model runner, our sampling)
    executorch         model.pte in the ExecuTorch runtime (XNNPACK), KV cache inside the program
    executorch-runner  model.pte in ExecuTorch's C++ TextLLMRunner: the code Android's LlmModule runs;
                       it samples on its own (greedy or temperature only)
    llamacpp           model.gguf in llama.cpp (llama-cpp-python's bindings), its own KV cache (F16 as
                       llama.cpp's users run it)

This module imports neither torch nor a runtime: each backend module is imported when chosen. Which
files a backend runs for a MODEL argument is :mod:`effllm.runtime.model_files`' job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .backend import Backend, Generation, GenerationError, GenerationStats
from .model_files import BACKENDS, FORMAT_OF_BACKEND, default_model, locate
from .native import quiet_native_output
from .sampling import GREEDY, Sampler, SamplingConfig, SamplingError


def backend_class(backend: str) -> type[Backend]:
    """The Backend subclass of ``backend`` (its module, and only that one, imported now)."""
    if backend == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend
    if backend == "onnxruntime":
        from .onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if backend == "genai":
        from .genai_backend import GenaiBackend

        return GenaiBackend
    if backend == "executorch":
        from .executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend
    if backend == "llamacpp":
        from .llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend
    raise GenerationError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def check_files(backend: str, path: str | Path) -> None:
    """The files ``backend`` is about to parse, checked first (effllm.model.file_checks): a truncated or
    crafted GGUF or safetensors file is one line (exit 2), not a crash inside llama.cpp or a traceback."""
    from effllm.model.file_checks import check_gguf, check_weights, warn_if_code_differs

    path, fmt = Path(path), FORMAT_OF_BACKEND.get(backend)
    if fmt == "gguf":
        gguf = path / "model.gguf" if path.is_dir() else path
        if gguf.is_file():
            check_gguf(gguf)
    elif fmt == "hf":
        check_weights(path)
        warn_if_code_differs(path)


def load_backend(backend: str, path: str | Path, threads: int | None = None) -> Backend:
    """The backend ``backend`` on ``path`` (a directory or file from :func:`locate`), its files checked first."""
    check_files(backend, path)
    return backend_class(backend)(Path(path), threads=threads)


class StreamDecoder:
    """Token ids in, text pieces out; the pieces concatenate to ``tokenizer.decode(all ids)``.

    A piece is released only when the decoded text so far extends what was already released and does
    not end in U+FFFD (a multi-byte character cut between tokens); ``finish`` releases the rest.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += piece
        return piece


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise GenerationError(f"no tokenizer at {path}; the model's directory must hold tokenizer.json")
    return Tokenizer.from_file(str(path))


class TextGenerator:
    """Prompt text in, streamed text out, over any :class:`Backend`; one sampling implementation."""

    def __init__(self, backend: Backend, tokenizer, eos_ids: Sequence[int] | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_ids = tuple(backend.eos_ids if eos_ids is None else eos_ids)
        self.stats = GenerationStats(backend.name)

    @property
    def name(self) -> str:
        return self.backend.name

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            if self.backend.bos_id is None:
                raise GenerationError("the prompt is empty and the model has no BOS token to start from; give a prompt")
            ids = [self.backend.bos_id]
        return ids

    def token_budget(self, prompt_len: int, max_new_tokens: int) -> tuple[int, bool]:
        """(new tokens allowed, whether the model's max_seq_len cut them)."""
        limit = self.backend.max_seq_len
        if limit is not None and prompt_len >= limit:
            raise GenerationError(
                f"the prompt has {prompt_len} tokens, the model serves {limit} at most (prompt + new tokens); "
                "shorten the prompt or export with a larger --max-seq-len"
            )
        if limit is not None and prompt_len + max_new_tokens > limit:
            return limit - prompt_len, True
        return max_new_tokens, False

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 128,
        sampling: SamplingConfig = GREEDY,
        stop_at_eos: bool = True,
    ) -> Iterator[int]:
        """New token ids, one at a time; ``self.stats`` is filled as they come."""
        if max_new_tokens < 0:
            raise GenerationError(f"max new tokens must be >= 0, got {max_new_tokens}")
        prompt_ids = [int(t) for t in prompt_ids]
        budget, cut = self.token_budget(len(prompt_ids), max_new_tokens)
        stats = self.stats = GenerationStats(self.backend.name, prompt_tokens=len(prompt_ids))
        sampler = Sampler(sampling)
        start = time.perf_counter()
        stats.stop_reason = "context" if cut else "max_new_tokens"
        if budget == 0:
            return
        logits = self.backend.forward(prompt_ids, 0)
        stats.prefill_s = time.perf_counter() - start
        pos = len(prompt_ids)
        first = None
        for i in range(budget):
            token = sampler(logits)
            now = time.perf_counter()
            if first is None:
                first = now
                stats.first_token_s = now - start
            if stop_at_eos and token in self.eos_ids:
                stats.stop_reason = "eos"
                break
            stats.new_tokens += 1
            stats.decode_s = now - first
            yield token
            if i + 1 < budget:
                logits = self.backend.forward([token], pos)
                pos += 1

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        sampling: SamplingConfig = GREEDY,
        stop_at_eos: bool = True,
    ) -> Iterator[str]:
        """Text pieces as tokens are generated; their concatenation is the decoded continuation."""
        decoder = StreamDecoder(self.tokenizer)
        for token in self.generate_ids(self.encode(prompt), max_new_tokens, sampling, stop_at_eos):
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.finish()
        if rest:
            yield rest

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        sampling: SamplingConfig = GREEDY,
        stop_at_eos: bool = True,
    ) -> Generation:
        ids = list(self.generate_ids(self.encode(prompt), max_new_tokens, sampling, stop_at_eos))
        return Generation(self.tokenizer.decode(ids, skip_special_tokens=True), ids, self.stats)

    def close(self) -> None:
        self.backend.close()


def load_generator(
    model: str | Path | None = None,
    backend: str = "auto",
    variant: str | None = None,
    threads: int | None = None,
):
    """A TextGenerator (or, for executorch-runner, a RunnerGenerator) for MODEL; default: the quickstart's."""
    if threads is not None and threads < 1:
        raise GenerationError(f"threads must be >= 1, got {threads}")
    located = locate(model if model is not None else default_model(), backend, variant)
    if located.backend == "executorch-runner":
        from .executorch_backend import RunnerGenerator

        return RunnerGenerator(located.path, located.tokenizer, threads=threads)
    tokenizer = load_tokenizer(located.tokenizer) if located.tokenizer is not None else None
    check_files(located.backend, located.path)  # before native output is quieted: its warning must show
    with quiet_native_output():
        loaded = load_backend(located.backend, located.path, threads)
    if tokenizer is None:  # a GGUF effllm did not write: the tokenizer inside it
        from .llamacpp_backend import GgufTokenizer

        tokenizer = GgufTokenizer(loaded)
    return TextGenerator(loaded, tokenizer)


__all__ = [
    "BACKENDS",
    "Backend",
    "Generation",
    "GenerationError",
    "GenerationStats",
    "SamplingConfig",
    "SamplingError",
    "StreamDecoder",
    "TextGenerator",
    "check_files",
    "load_backend",
    "load_generator",
    "locate",
]
