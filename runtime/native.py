"""Helpers for the native (C++) libraries under the runtimes: muting their direct output, and
registering ExecuTorch's LLM kernels.

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


def load_llm_kernels() -> None:
    """Register ExecuTorch's LLM ops (torch.ops.llama.update_cache, custom_sdpa), which every .pte effllm
    writes needs, and its quantized ops (quantized_decomposed::embedding_byte, 8da4w's embedding): their
    export-time definitions and their runtime kernels (docs/formats.md)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (loads libcustom_ops_aot_lib)
    import executorch.kernels.quantized  # noqa: F401  (loads libquantized_ops_aot_lib)


def prepare_executorch(threads: int | None) -> None:
    """Register the LLM kernels our .pte files use, and size XNNPACK's thread pool (default: the
    number of performance cores); the runtime's logging meanwhile is muted."""
    with quiet_native_output():  # importing the runtime already logs CPU probing from C++
        from executorch.extension.pybindings import portable_lib

        load_llm_kernels()
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        else:
            portable_lib._threadpool_get_thread_count()  # creates the pool now, while its logging is muted
