"""What every effllm command line shares: one usage-error style, and whole-number argument types.

A usage error is one line on stderr, ``PROG: error: MESSAGE; see PROG --help``, and exit code 2: the
same shape as the bad-input errors effllm.common.errors.run_cli reports. Every command (effllm-train,
effllm-eval, effllm-export, effllm-generate, effllm-bench) builds its parser on :class:`CliParser`; it
lives in the core so that runtime and export can import it (imports run core <- runtime <- export).
"""

from __future__ import annotations

import argparse

from effllm.common.errors import EXIT_BAD_INPUT


class CliParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, as everywhere in effllm."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
