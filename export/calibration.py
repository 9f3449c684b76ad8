"""The quantizers' calibration: held-out text in, the second moments of each weight's inputs out.

Computed once per export, on first use, from held-out windows the verification does not judge
(verify.calibration_windows): ONNX int8/int4 and 8da4w fit their grids and codes with E[x x^T]
(weight_quant.py), and llama.cpp's quantizer takes its diagonal as its importance matrix (gguf_quantize.py).
"""

from __future__ import annotations

from .heldout import HeldoutTokens
from .inputs import Plan


def load_heldout(plan: Plan) -> HeldoutTokens:
    """The held-out tokens that verification and calibration share (heldout.py says which text)."""
    from tokenizers import Tokenizer

    from .heldout import heldout_tokens
    from .verify import heldout_limit

    tokenizer = Tokenizer.from_file(str(plan.model_dir / "tokenizer.json"))
    return heldout_tokens(plan.eval_text, plan.heldout_bin, tokenizer, heldout_limit())


class Calibration:
    """The calibration tables of one export's model."""

    def __init__(self, model, heldout: HeldoutTokens, max_seq_len: int):
        from .verify import calibration_windows, eval_windows

        self.model = model
        self.windows = calibration_windows(heldout.ids, max_seq_len)
        self.overlaps_eval = bool(self.windows) and self.windows[0] == (eval_windows(heldout.ids, max_seq_len) or [None])[0]
        self._by_linear = self._by_weight = None

    def by_linear(self) -> dict:
        """{nn.Linear name: E[x x^T] of its input, [in, in]}."""
        if self._by_linear is None:
            from .weight_quant import input_gram

            self._by_linear = input_gram(self.model, self.windows)
        return self._by_linear

    def importance(self) -> dict:
        """{nn.Linear name: mean squared input per channel} (E[x x^T]'s diagonal: llama.cpp's imatrix)."""
        return {name: gram.diagonal() for name, gram in self.by_linear().items()}

    def by_onnx_weight(self) -> dict:
        """quantize.grams_by_weight's table, for the ONNX graph's (fused) weights."""
        if self._by_weight is None:
            from .quantize import grams_by_weight

            self._by_weight = grams_by_weight(self.model, self.by_linear())
        return self._by_weight

    def summary_fields(self) -> dict:
        if self._by_linear is None:
            return {}
        return {
            "calibration_tokens": sum(len(w) for w in self.windows),
            "calibration_overlaps_eval": self.overlaps_eval,
        }
