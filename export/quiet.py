"""Keep the exporters' own chatter (progress lines, warnings, log records, native runtime logs) off the
terminal while effllm-export works, and restore every setting afterwards."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from effllm.runtime.native import quiet_native_output

# Libraries whose log records below ERROR, while they export, are progress or environment notes (torch.onnx's
# "torchvision is not installed. Skipping torchvision::nms" and its kin), not news for our users.
LIBRARY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "executorch", "torchao")


@contextlib.contextmanager
def quiet_loggers(names=LIBRARY_LOGGERS, level: int = logging.ERROR):
    """Raise these loggers to ``level`` meanwhile, and restore their own levels afterwards."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)


@contextlib.contextmanager
def quiet_progress_bars():
    """No transformers progress bar ("Loading weights") meanwhile; its setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_libraries(native: bool = False):
    """Keep the exporters' own chatter off the terminal while they run: torch.onnx's step lines (stdout),
    warnings, and library log records below ERROR (torch.onnx's "torchvision is not installed.
    Skipping torchvision::nms" and its kin). Everything is restored when the block ends.

    native=True also silences C++ code that writes to the process's stdout/stderr directly (the
    ExecuTorch runtime logs CPU probing when it loads); Python errors still surface, after it ends.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(quiet_loggers())
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if native:
            stack.enter_context(quiet_native_output())
        yield
