"""model.pte on a laptop: the ExecuTorch runtime (our loop), or ExecuTorch's C++ LLM runner (its loop).

``ExecuTorchBackend``: forward(tokens int64[1, T], input_pos int64[T]) -> the last position's logits
[1, 1, vocab] through ``executorch.runtime`` (older effllm files return [1, T, vocab]; the last row is
used, so both run); forward_all runs one token per call to get every position's. The KV cache lives in
the program's buffers, so start_pos 0 simply overwrites it from the beginning. Sampling is
effllm.runtime.sampling's, like every other backend's.

``RunnerGenerator``: the same file in ``TextLLMRunner``, the C++ runner that Android's LlmModule
wraps (tokenizer, prefill, decode and sampling all in C++). It is the laptop check that the phone app
will run the file, and what ``--backend executorch-runner`` uses. Its sampler knows greedy and
temperature only; top-k, top-p and a seed are refused rather than ignored.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .backend import Backend, Generation, GenerationError, GenerationStats
from .native import prepare_executorch, quiet_native_output
from .sampling import GREEDY, SamplingConfig, SamplingError


def constant_method(program, name: str, default=None):
    """A value export stored as a constant method (get_max_seq_len, get_eos_ids, ...)."""
    if name not in program.method_names:
        return default
    values = program.load_method(name).execute([])
    return list(values) if len(values) != 1 or name == "get_eos_ids" else values[0]


def pte_path(path: str | Path) -> Path:
    path = Path(path)
    path = path / "model.pte" if path.is_dir() else path
    if not path.is_file():
        raise GenerationError(f"no model.pte at {path}; give an ExecuTorch variant directory written by effllm-export")
    return path


class ExecuTorchBackend(Backend):
    name = "executorch"

    @classmethod
    def import_runtime(cls, threads: int | None = None) -> None:
        prepare_executorch(threads)  # first: it keeps OpenMP to one thread before torch loads (native.py)
        from executorch.runtime import Runtime

        Runtime.get()

    def __init__(self, path: str | Path, threads: int | None = None, etdump: bool = False):
        self.import_runtime(threads)  # the runtime's setup (threads, LLM kernels) lives there
        import torch
        from executorch.runtime import Runtime

        self.path = pte_path(path)
        self._torch = torch
        # etdump: record every operator's and delegate call's time (bench/decode_profile.py); write_etdump saves it
        self.program = Runtime.get().load_program(str(self.path), enable_etdump=etdump)
        if "forward" not in self.program.method_names:
            raise GenerationError(f"{self.path} has no forward method; re-export it with effllm-export")
        self.method = self.program.load_method("forward")
        self.max_seq_len = int(constant_method(self.program, "get_max_seq_len", 0)) or None
        self.eos_ids = tuple(int(e) for e in constant_method(self.program, "get_eos_ids", []))
        bos = constant_method(self.program, "get_bos_id")
        self.bos_id = int(bos) if bos is not None else None
        vocab = constant_method(self.program, "get_vocab_size")
        self.vocab_size = int(vocab) if vocab is not None else None

    def forward(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        torch = self._torch
        n = len(tokens)
        if self.max_seq_len is not None and start_pos + n > self.max_seq_len:
            raise GenerationError(f"positions {start_pos}..{start_pos + n - 1} exceed max_seq_len {self.max_seq_len}")
        out = self.method.execute(
            [torch.tensor([list(tokens)], dtype=torch.long), torch.arange(start_pos, start_pos + n, dtype=torch.long)]
        )
        return out[0][0, -1].numpy()

    def forward_all(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        """One call per token: the program returns the last position's logits only (docs/formats.md)."""
        return np.stack([self.forward([token], start_pos + i) for i, token in enumerate(tokens)])

    def write_etdump(self, path: str | Path) -> Path:
        """Save the timings recorded since load (needs etdump=True) as an ETDump file for devtools' Inspector."""
        path = Path(path)
        self.program.write_etdump_result_to_file(str(path), str(path.with_suffix(".debug")))  # no debug buffer kept
        return path

    def close(self) -> None:
        self.method = None
        self.program = None


class RunnerGenerator:
    """TextLLMRunner behind the TextGenerator interface (stream / generate); text in, text out."""

    name = "executorch-runner"

    def __init__(self, path: str | Path, tokenizer: str | Path, threads: int | None = None):
        self.path = pte_path(path)
        tokenizer = Path(tokenizer)
        if not tokenizer.is_file():
            raise GenerationError(f"no tokenizer at {tokenizer}; the variant directory must hold tokenizer.json")
        prepare_executorch(threads)
        with quiet_native_output():
            from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

            self.runner = TextLLMRunner(str(self.path), str(tokenizer))
        self._config_class = GenerationConfig
        self.stats = GenerationStats(self.name)
        self.runner_stats: dict = {}

    @staticmethod
    def check_options(prompt: str, sampling: SamplingConfig, stop_at_eos: bool) -> None:
        """Refuse what the C++ runner cannot do (rather than ignore it); callable before loading anything."""
        if sampling.top_k or sampling.top_p < 1 or sampling.seed is not None:
            raise SamplingError(
                "the executorch-runner backend (ExecuTorch's C++ runner, as on phones) samples with a temperature "
                "only; drop --top-k/--top-p/--seed or use --backend executorch"
            )
        if not stop_at_eos:
            raise GenerationError("the executorch-runner backend always stops at EOS; use --backend executorch")
        if not prompt:
            raise GenerationError("the executorch-runner backend needs a non-empty prompt")

    def stream(
        self, prompt: str, max_new_tokens: int = 128, sampling: SamplingConfig = GREEDY, stop_at_eos: bool = True
    ) -> Iterator[str]:
        """Text pieces as the C++ runner produces them (its own stdout logging is muted meanwhile)."""
        self.check_options(prompt, sampling, stop_at_eos)
        config = self._config_class(
            max_new_tokens=int(max_new_tokens), temperature=float(sampling.temperature), echo=False
        )
        pieces: queue.Queue = queue.Queue()
        done = object()
        errors: list[BaseException] = []
        captured: list[str] = []
        count = [0]

        def on_token(piece: str) -> None:
            count[0] += 1
            pieces.put(piece)

        def run():
            try:
                with quiet_native_output():
                    self.runner.reset()
                    self.runner.generate(prompt, config, on_token, lambda s: captured.append(s.to_json_string()))
            except BaseException as err:  # re-raised in the consumer's thread
                errors.append(err)
            finally:
                pieces.put(done)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while (piece := pieces.get()) is not done:
                if piece:
                    yield piece
        finally:
            if worker.is_alive():
                with contextlib.suppress(Exception):
                    self.runner.stop()
            worker.join()
        if errors:
            raise GenerationError(f"ExecuTorch's runner failed: {errors[0]}") from None
        self.runner_stats = json.loads(captured[-1]) if captured else {}
        self.stats = stats_from_runner(self.runner_stats, count[0], max_new_tokens)

    def generate(
        self, prompt: str, max_new_tokens: int = 128, sampling: SamplingConfig = GREEDY, stop_at_eos: bool = True
    ) -> Generation:
        text = "".join(self.stream(prompt, max_new_tokens, sampling, stop_at_eos))
        return Generation(text, [], self.stats)

    def close(self) -> None:
        self.runner = None


def stats_from_runner(raw: dict, new_tokens: int, max_new_tokens: int) -> GenerationStats:
    """GenerationStats from the runner's stats JSON (the PyTorchObserver line; see android.py)."""
    from .android import observer_metrics

    stats = GenerationStats(RunnerGenerator.name)
    if not raw:
        return stats
    m = observer_metrics(raw)
    stats.prompt_tokens = int(raw.get("prompt_tokens", 0))
    stats.new_tokens = new_tokens  # the runner's generated_tokens leaves out the first one
    stats.prefill_s = m["prefill_s"] or 0.0
    stats.first_token_s = m["ttft_s"] or 0.0
    stats.decode_s = m["decode_s"] or 0.0
    stats.stop_reason = "max_new_tokens" if stats.new_tokens >= max_new_tokens else "eos"
    return stats
