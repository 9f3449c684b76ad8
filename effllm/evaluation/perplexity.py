"""Held-out perplexity with sliding windows, on any text effllm-train accepts or on a token file.

Every token after the first is scored once, with at least window - stride tokens of context. The
model and tokenizer come loaded (effllm.model.model_dir: the installed classes, no directory code).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from effllm.evaluation.errors import EvalError


@torch.no_grad()
def sliding_window_nll(model, ids: torch.Tensor, window: int, stride: int, show_progress: bool = False):
    """(total negative log-likelihood, tokens scored) over a 1-D token tensor.

    Every token after the first is scored exactly once. The first window scores its first
    ``window - 1`` tokens; each later one scores the next ``stride`` tokens and gives them at least
    ``window - stride`` tokens of context.
    """
    if not 1 <= stride < window:
        raise EvalError(f"--stride must be at least 1 and below the window ({window}); got {stride}")
    model.eval()
    device = next(model.parameters()).device
    n = ids.numel()
    total, pos = 0.0, 1  # pos: the next token to score
    bar = tqdm(total=max(n - 1, 0), desc="perplexity", unit="tok", disable=not show_progress)
    while pos < n:
        end = min(pos + (window - 1 if pos == 1 else stride), n)
        chunk = ids[max(0, end - window) : end].to(device)
        new = end - pos
        logits = model(chunk[None, :-1], use_cache=False).logits[0, -new:].float()
        total += F.cross_entropy(logits, chunk[-new:], reduction="sum").item()
        bar.update(new)
        pos = end
    bar.close()
    return total, max(n - 1, 0)


def load_eval_tokens(path_or_data: list[str] | None, tokenizer, max_tokens: int | None) -> torch.Tensor:
    """Tokens to score: a token file (.bin with meta.json beside it) or text read like training data."""
    from effllm.data.sources import DataError, iter_pieces, resolve_sources

    if path_or_data and len(path_or_data) == 1 and path_or_data[0].endswith(".bin"):
        path = Path(path_or_data[0])
        meta = path.parent / "meta.json"
        if not path.is_file() or not meta.is_file():
            raise EvalError(f"{path}: a token file needs meta.json beside it (as effllm-train writes in <out>/data)")
        tokens = np.memmap(path, dtype=json.loads(meta.read_text())["dtype"], mode="r")
        if max_tokens:
            tokens = tokens[:max_tokens]
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    ids: list[int] = []
    try:
        for source in resolve_sources(path_or_data):
            for text, end_of_doc in iter_pieces(source):
                ids += tokenizer(text, add_special_tokens=False)["input_ids"]
                if end_of_doc and tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
                if max_tokens and len(ids) >= max_tokens:
                    return torch.tensor(ids[:max_tokens])
    except DataError as err:
        raise EvalError(str(err)) from None
    if len(ids) < 2:
        raise EvalError("the evaluation text has fewer than 2 tokens; give more text")
    return torch.tensor(ids)


def perplexity(model, tokenizer, model_dir: Path, data: list[str] | None, window: int | None, stride: int | None,
               max_tokens: int | None, show_progress: bool) -> dict:  # fmt: skip
    if data is None:
        heldout = model_dir.parent / "data" / "heldout.bin"
        if not heldout.is_file():
            raise EvalError(f"no --data given and no {heldout}; pass --data FILE (text, JSONL, Parquet or a .bin)")
        data = [str(heldout)]
    ids = load_eval_tokens(data, tokenizer, max_tokens)
    window = window or min(getattr(model.config, "max_position_embeddings", 1024), 1024)
    stride = stride or max(1, window // 2)
    nll, count = sliding_window_nll(model, ids, window, stride, show_progress)
    return {"data": data, "tokens": count, "window": window, "stride": stride,
            "nll_per_token": nll / count, "perplexity": math.exp(nll / count)}  # fmt: skip
