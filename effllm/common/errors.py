"""One error family and one way for every command to report it.

Every stage raises a subclass of ``EffllmError`` for bad input (a missing file, an impossible
target, a model a format cannot express). Its message is one line that names the problem and the
fix. ``run_cli`` is the single place that turns it into that line on stderr and exit code 2, so the
commands cannot drift into different usage-error styles. Anything else is a bug and keeps its
traceback.

This module imports nothing heavy: the ONNX runtime path uses it without torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class EffllmError(ValueError):
    """Bad input: the message is one line, what is wrong and how to fix it (commands exit 2)."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name: for wrapping a
    third-party error into one line of ours."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(prog: str, main: Callable[[], int | None]) -> int:
    """Run a command's body; bad input -> one line on stderr and exit 2, Ctrl-C -> exit 130.

    Library log noise (torchao's CUDA kernels, torch's pytree) is quieted first: here, at a command's
    entry, never on ``import effllm``."""
    from effllm import quiet_library_logs

    quiet_library_logs()
    try:
        return main() or 0
    except EffllmError as err:
        print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
