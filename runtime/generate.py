"""One generator over every backend: find the model files, load a backend, sample, stream text.

A backend is anything with ``forward(tokens, start_pos) -> logits of the last position``: it owns
its KV cache, ``start_pos == 0`` starts a new sequence. The loop around it (prefill, sampling with
:mod:`effllm.runtime.sampling`, EOS, streaming, timing) is written once, here:

    torch              the model directory, eager PyTorch with the model's own KV cache
    onnxruntime        model.onnx in our own numpy + onnxruntime loop (IO binding); imports no torch
    genai              the same directory in onnxruntime-genai (its model runner, our sampling)
    executorch         model.pte in the ExecuTorch runtime (XNNPACK), KV cache inside the program
    executorch-runner  model.pte in ExecuTorch's C++ TextLLMRunner: the code Android's LlmModule runs;
                       it samples on its own (greedy or temperature only)

This module imports neither torch nor a runtime: each backend module is imported when chosen.

Where the files are (``locate``): MODEL may be a model directory (effllm-train: config.json,
model.safetensors, tokenizer.json), an export directory (effllm-export: onnx/, onnx-int8/, onnx-int4/,
executorch/, executorch-8da4w/), one variant directory of it, a model.onnx / model.pte file, or a
run directory holding model/ and export/. A model directory finds its export beside it (model ->
export, as effllm-train and effllm-export lay them out, or DIR -> DIR-export) and vice versa.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .sampling import GREEDY, Sampler, SamplingConfig, SamplingError

BACKENDS = ("torch", "onnxruntime", "genai", "executorch", "executorch-runner")
FORMAT_OF_BACKEND = {
    "torch": "hf",
    "onnxruntime": "onnx",
    "genai": "onnx",
    "executorch": "pte",
    "executorch-runner": "pte",
}
FP32_VARIANT = {"onnx": "onnx", "pte": "executorch"}
AUTO_ORDER = ("onnxruntime", "executorch", "torch")  # what "auto" picks, first available
DEFAULT_EXPORT = Path("runs/quickstart/export")
DEFAULT_MODEL = Path("runs/quickstart/model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class GenerationError(ValueError):
    """Input the user must fix (missing files, a prompt too long, options a backend lacks); one line."""


# ---- backends -------------------------------------------------------------------------------------
class Backend:
    """One model in one runtime, batch 1. Subclasses set the attributes and implement forward."""

    name = "backend"
    path: Path  # the file that runs (model.onnx, model.pte) or the directory (torch, genai)
    max_seq_len: int | None = None  # longest sequence (prompt + new tokens) it serves; None: no limit known
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    vocab_size: int | None = None

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        """Run ``tokens`` at positions start_pos.. and return the last position's logits (float32 [vocab]).

        start_pos 0 starts a new sequence; otherwise it must equal the number of positions already run.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Free what the runtime holds (sessions, programs); the default lets the GC do it."""


def load_backend(backend: str, path: str | Path, threads: int | None = None) -> Backend:
    """The backend ``backend`` on ``path`` (a directory or file from :func:`locate`)."""
    path = Path(path)
    if backend == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(path, threads=threads)
    if backend == "onnxruntime":
        from .onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, threads=threads)
    if backend == "genai":
        from .genai_backend import GenaiBackend

        return GenaiBackend(path, threads=threads)
    if backend == "executorch":
        from .executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend(path, threads=threads)
    raise GenerationError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# ---- where the files are --------------------------------------------------------------------------
@dataclass
class Located:
    backend: str
    path: Path  # what load_backend takes: model dir (torch), variant dir (onnx, genai), model.pte (executorch)
    variant: str  # "model" for torch, else the export variant's directory name
    tokenizer: Path  # tokenizer.json


@dataclass
class ModelFiles:
    """Everything found from one MODEL argument: the torch model dir and the export variants."""

    hf: Path | None = None
    variants: dict[str, tuple[str, Path]] = field(default_factory=dict)  # name -> (format, variant dir)

    def formats(self) -> set[str]:
        found = {fmt for fmt, _ in self.variants.values()}
        return found | ({"hf"} if self.hf else set())


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_FILES)


def variant_format(path: Path) -> str | None:
    if (path / "model.onnx").is_file():
        return "onnx"
    if (path / "model.pte").is_file():
        return "pte"
    return None


def export_variants(export_dir: Path) -> dict[str, tuple[str, Path]]:
    out = {}
    if export_dir.is_dir():
        for sub in sorted(export_dir.iterdir()):
            fmt = variant_format(sub) if sub.is_dir() and not sub.name.startswith(".") else None
            if fmt:
                out[sub.name] = (fmt, sub)
    return out


def sibling_export(model_dir: Path) -> Path:
    resolved = model_dir.resolve()
    return resolved.parent / "export" if resolved.name == "model" else resolved.with_name(resolved.name + "-export")


def sibling_model(export_dir: Path) -> Path | None:
    resolved = export_dir.resolve()
    if resolved.name == "export":
        return resolved.parent / "model"
    if resolved.name.endswith("-export"):
        return resolved.with_name(resolved.name[: -len("-export")])
    return None


def find_model_files(model: Path) -> ModelFiles:
    """What MODEL holds, or GenerationError naming what was expected."""
    if not model.exists():
        raise GenerationError(
            f"{model} does not exist; give a model directory (effllm-train), an export directory "
            "(effllm-export), one of its variant directories, or a model.onnx / model.pte file"
        )
    files = ModelFiles()
    if model.is_file():
        fmt = {".onnx": "onnx", ".pte": "pte"}.get(model.suffix)
        if fmt is None:
            raise GenerationError(f"{model} is neither a .onnx nor a .pte file; give a model or export directory")
        files.variants[model.parent.name] = (fmt, model.parent)
        return files
    fmt = variant_format(model)
    if fmt:
        files.variants[model.name] = (fmt, model)
        return files
    if is_model_dir(model):
        files.hf = model
        files.variants = export_variants(sibling_export(model))
        return files
    variants = export_variants(model)
    if variants:
        files.variants = variants
        hf = sibling_model(model)
        files.hf = hf if hf is not None and is_model_dir(hf) else None
        return files
    if (model / "export").is_dir() or is_model_dir(model / "model"):  # a run directory (effllm-train --out)
        files.variants = export_variants(model / "export")
        files.hf = model / "model" if is_model_dir(model / "model") else None
        if files.variants or files.hf:
            return files
    raise GenerationError(
        f"{model} holds no model: expected config.json + model.safetensors (a model directory), model.onnx or "
        "model.pte (an exported variant), or variant subdirectories such as onnx/ and executorch/ (effllm-export)"
    )


def locate(model: str | Path, backend: str = "auto", variant: str | None = None) -> Located:
    """Which files ``backend`` runs for MODEL; GenerationError (one line, with the fix) when there are none."""
    model = Path(model)
    files = find_model_files(model)
    if backend != "auto" and backend not in BACKENDS:
        raise GenerationError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if variant is not None and variant not in files.variants and not (variant == "model" and files.hf):
        known = sorted(files.variants) + (["model"] if files.hf else [])
        raise GenerationError(f"no variant {variant!r} in {model}; found: {', '.join(known) or 'none'}")
    if backend == "auto":
        if variant is not None:
            fmt = "hf" if variant == "model" else files.variants[variant][0]
            backend = {"hf": "torch", "onnx": "onnxruntime", "pte": "executorch"}[fmt]
        else:
            backend = next(b for b in AUTO_ORDER if FORMAT_OF_BACKEND[b] in files.formats())
    fmt = FORMAT_OF_BACKEND[backend]
    if fmt == "hf":
        if files.hf is None:
            raise GenerationError(
                f"--backend torch needs the model directory (config.json, model.safetensors) and none was found "
                f"from {model}; give the model directory itself (e.g. runs/quickstart/model)"
            )
        return Located(backend, files.hf, "model", files.hf / "tokenizer.json")
    candidates = {name: p for name, (f, p) in files.variants.items() if f == fmt}
    if variant == "model":
        raise GenerationError("variant 'model' is the torch model directory; use --backend torch (or auto) for it")
    if variant is not None:
        if files.variants[variant][0] != fmt:
            raise GenerationError(
                f"variant {variant!r} is {files.variants[variant][0]}, which --backend {backend} does not run; "
                f"choose one of: {', '.join(sorted(candidates)) or 'none found'}"
            )
        name = variant
    elif candidates:
        name = FP32_VARIANT[fmt] if FP32_VARIANT[fmt] in candidates else sorted(candidates)[0]
    else:
        what = "an ONNX export (model.onnx)" if fmt == "onnx" else "an ExecuTorch export (model.pte)"
        raise GenerationError(
            f"--backend {backend} needs {what} and none was found from {model}; run effllm-export on the model "
            "directory first, or choose another --backend"
        )
    vdir = candidates[name]
    path = vdir / "model.pte" if fmt == "pte" else vdir
    tokenizer = vdir / "tokenizer.json"
    if not tokenizer.is_file() and files.hf is not None:
        tokenizer = files.hf / "tokenizer.json"
    return Located(backend, path, name, tokenizer)


def default_model() -> Path:
    """The quickstart's export, else its model directory; GenerationError when neither exists."""
    for candidate in (DEFAULT_EXPORT, DEFAULT_MODEL):
        if candidate.exists():
            return candidate
    raise GenerationError(
        f"no MODEL given and no quickstart model found ({DEFAULT_EXPORT} or {DEFAULT_MODEL}); run effllm-train "
        "and effllm-export first, or give a model directory"
    )


# ---- generation -----------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    backend: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward pass
    first_token_s: float = 0.0  # from the start (prompt already tokenized) to the first new token
    decode_s: float = 0.0  # from the first new token to the last
    stop_reason: str = ""  # "eos", "max_new_tokens", "context" (the model's max_seq_len), or "stopped"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d

    def summary(self) -> str:
        def rate(x):
            return "-" if x != x else f"{x:.1f}"

        return (
            f"[{self.backend}] {self.prompt_tokens} prompt tokens ({rate(self.prefill_tokens_per_s)} tok/s), "
            f"{self.new_tokens} new tokens, first after {1000 * self.first_token_s:.0f} ms, "
            f"decode {rate(self.decode_tokens_per_s)} tok/s, stop: {self.stop_reason}"
        )


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats


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
    tokenizer = load_tokenizer(located.tokenizer)
    with quiet_native_output():
        loaded = load_backend(located.backend, located.path, threads)
    return TextGenerator(loaded, tokenizer)


# ---- small shared helpers -------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_native_output(enabled: bool = True):
    """Send what C++ code writes straight to file descriptors 1 and 2 to /dev/null meanwhile.

    The ExecuTorch runtime and runner log CPU probing and per-call details there; Python exceptions
    still propagate (they are raised after the descriptors are restored).
    """
    if not enabled:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def as_id_list(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


__all__ = [
    "BACKENDS",
    "Backend",
    "Generation",
    "GenerationError",
    "GenerationStats",
    "Located",
    "SamplingConfig",
    "SamplingError",
    "StreamDecoder",
    "TextGenerator",
    "load_backend",
    "load_generator",
    "locate",
]
