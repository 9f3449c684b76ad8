"""effllm-eval's error: bad input for an evaluation (the message names the problem and the fix)."""

from effllm.common.errors import EffllmError


class EvalError(EffllmError):
    """Bad input for effllm-eval: the message names the problem and the fix."""
