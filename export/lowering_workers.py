"""ExecuTorch's XNNPACK lowering in processes of their own, while effllm-export does everything else.

The lowering is single-threaded Python (torch.export re-traces the graph under symbolic shapes for every
delegated partition, and again in each of XNNPACK's passes): on SmolLM2-135M pruned to 0.7 it was 7 of the
whole export's 13 minutes (fp32 .pte 128 s, 8da4w 289 s) while the second core idled. So the .pte variants
are handed to worker processes first, and the main process exports and verifies the ONNX and GGUF variants
beside them; it waits for a .pte only when it comes to verify it.

A worker is a spawned interpreter (a forked one would inherit the parent's OpenMP thread pool, which is not
fork-safe) that loads its own fp32 copy of the model from the model directory and gets the calibration's
E[x x^T] tables through shared memory. It writes each .pte into the staging directory and, beside it, a
JSON outcome (seconds taken, or the error): a worker that dies without one (killed, out of memory) is
reported by its exit code.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from effllm.common.errors import EffllmError

# A worker's peak resident memory, as a multiple of the model's fp32 weights plus the interpreter with torch
# and ExecuTorch loaded: the 0.7-pruned SmolLM2-135M (94M parameters, 377 MB in fp32) peaked at WORKER_PEAK
# (measured: see docs/formats.md, "Export time"). Workers run only where the machine holds them beside the
# main process; otherwise the .pte variants are lowered in the main process, one after the other.
WORKER_WEIGHT_MULTIPLE = 6
WORKER_BASE_BYTES = 1 << 30


@dataclass
class LoweringJob:
    """One .pte to write: ``quantize`` None (fp32) or "8da4w"."""

    name: str
    target: Path
    quantize: str | None


def worker_count(jobs: int, model_bytes: int, memory_bytes: int | None = None) -> int:
    """How many lowering processes to start for ``jobs`` .pte variants of a model of ``model_bytes`` (fp32):
    one per .pte, as many as the machine's memory holds beside the main process (0: lower in the main
    process). Not capped by the cores: a worker is single-threaded, so more workers than cores only take
    turns on them, without the waits of a thread pool whose threads are not all running."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_process = WORKER_WEIGHT_MULTIPLE * model_bytes + WORKER_BASE_BYTES
    fit = memory_bytes // per_process - 1  # the main process holds about as much
    return max(0, min(jobs, fit))


def _outcome_path(job: LoweringJob) -> Path:
    return job.target.parent / f".{job.name}.lowered.json"


def _lower(jobs: list[LoweringJob], model_dir: str, max_seq_len: int, group_size: int, grams: dict | None) -> None:
    """A worker's body: lower each job in turn, writing its outcome file (the main process reads it)."""
    import torch

    from effllm import EfficientLLMForCausalLM

    from .executorch_export import export_executorch
    from .quiet import quiet_libraries, quiet_progress_bars

    torch.set_num_threads(1)  # the lowering is single-threaded; the main process keeps the other cores
    with quiet_progress_bars():
        model = EfficientLLMForCausalLM.from_pretrained(model_dir, dtype="float32").eval().requires_grad_(False)
    for job in jobs:
        start = time.perf_counter()
        try:
            with quiet_libraries(native=True):
                export_executorch(
                    model, job.target, max_seq_len, job.quantize, group_size, model_dir,
                    grams if job.quantize else None,
                )  # fmt: skip
            outcome = {"seconds": time.perf_counter() - start}
        except Exception as err:  # reported by the main process, which stops the export
            outcome = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        path = _outcome_path(job)
        path.with_suffix(".tmp").write_text(json.dumps(outcome))
        path.with_suffix(".tmp").rename(path)
        if "error" in outcome:
            return


class LoweringWorkers:
    """The .pte variants of one export, lowered in ``workers`` background processes (round robin)."""

    def __init__(self, jobs: list[LoweringJob], workers: int, model_dir: Path, max_seq_len: int, group_size: int,
                 grams: dict | None):  # fmt: skip
        import torch.multiprocessing  # noqa: F401  (registers the reductions that pass tensors by shared memory)

        context = multiprocessing.get_context("spawn")
        self.jobs = {job.name: job for job in jobs}
        self.finished: set[str] = set()
        self.owner: dict[str, multiprocessing.process.BaseProcess] = {}
        self.processes = []
        for i in range(workers):
            share = jobs[i::workers]
            process = context.Process(
                target=_lower, args=(share, str(model_dir), max_seq_len, group_size, grams), daemon=True,
                name=f"effllm-export lowering {i}",
            )  # fmt: skip
            process.start()
            self.processes.append(process)
            self.owner.update({job.name: process for job in share})

    def wait(self, name: str) -> float:
        """Block until the .pte of variant ``name`` is written; its lowering's seconds. Raises the worker's error."""
        job, process = self.jobs[name], self.owner[name]
        path = _outcome_path(job)
        while not path.exists():
            if not process.is_alive() and not path.exists():
                raise EffllmError(
                    f"the ExecuTorch lowering of {name} stopped without a result (worker exit code "
                    f"{process.exitcode}; out of memory?); rerun with --lowering-workers 0 to lower in one process"
                )
            time.sleep(0.2)
        outcome = json.loads(path.read_text())
        path.unlink()
        self.finished.add(name)
        if "error" in outcome:
            raise RuntimeError(f"the ExecuTorch lowering of {name} failed in its worker: {outcome['error']}\n"
                               f"{outcome['traceback']}")  # fmt: skip
        return outcome["seconds"]

    def running(self) -> bool:
        """Whether a .pte is still being lowered (one that wait() has not returned yet)."""
        return len(self.finished) < len(self.jobs)

    def close(self) -> None:
        """Stop every worker still running (an export that failed elsewhere) and reap them."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join()
