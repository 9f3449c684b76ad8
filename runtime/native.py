"""Helpers for the native (C++) libraries under the runtimes: muting their direct output, registering
ExecuTorch's LLM kernels, and keeping OpenMP's threads out of ExecuTorch's way.

Both the runtime backends and ``effllm.export`` use them; they live here, below export, so that
imports run one way (core <- runtime <- export). Nothing heavy is imported at module level.
"""

from __future__ import annotations

import contextlib
import os
import sys


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


# OpenMP settings for a process that runs a .pte in the Python runtime. ExecuTorch's LLM kernels there
# (custom_sdpa) reach libtorch's BLAS, whose OpenMP worker threads keep spinning after each call and take
# the cores from XNNPACK's own thread pool, which does the model's work. On a 2-core VM the 0.7-pruned
# SmolLM2-135M's 8da4w .pte decoded at 19.8 ms a token with OpenMP at 2 threads and 3.7 ms at 1
# (custom_sdpa 13.6 -> 0.8 ms, the int4 matmuls 2.1 -> 0.7 ms); torch.set_num_threads(1) in the running
# process did not help (the spinning threads belong to XNNPACK's workers). libgomp reads these variables
# once, when torch loads, so they must be set before that.
EXECUTORCH_OPENMP_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def openmp_single_thread_for_executorch() -> None:
    """Set EXECUTORCH_OPENMP_ENV in this process (variables the user set stay) if torch is not loaded yet.

    Once torch is imported OpenMP has read its settings, and the process's torch may need its threads (the
    exporter's, the torch backend's): then nothing changes.
    """
    if "torch" not in sys.modules:
        for name, value in EXECUTORCH_OPENMP_ENV.items():
            os.environ.setdefault(name, value)


def load_llm_kernels() -> None:
    """Register ExecuTorch's LLM ops (torch.ops.llama.update_cache, custom_sdpa), which every .pte effllm
    writes needs, and its quantized ops (quantized_decomposed::embedding_byte, 8da4w's embedding): their
    export-time definitions and their runtime kernels (docs/formats.md)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (loads libcustom_ops_aot_lib)
    import executorch.kernels.quantized  # noqa: F401  (loads libquantized_ops_aot_lib)


def prepare_executorch(threads: int | None) -> None:
    """Register the LLM kernels our .pte files use, and size XNNPACK's thread pool (default: the
    number of performance cores); the runtime's logging meanwhile is muted. In a process that has not
    loaded torch yet, OpenMP is first kept to one thread (openmp_single_thread_for_executorch)."""
    openmp_single_thread_for_executorch()  # before the runtime's import loads torch
    with quiet_native_output():  # importing the runtime already logs CPU probing from C++
        from executorch.extension.pybindings import portable_lib

        load_llm_kernels()
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        else:
            portable_lib._threadpool_get_thread_count()  # creates the pool now, while its logging is muted
