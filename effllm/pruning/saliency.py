"""Per-group saliency from the training backward pass (docs/method.md "Saliency").

For every minimal group G, two running statistics of the current gradient g and weights w:

    A_G <- beta*A_G + (1-beta) * sum_G g*w          B_G <- beta*B_G + (1-beta) * sum_G (g*w)^2
    s_G  = | -A_G + B_G / 2 |     (bias-corrected: divided by 1 - beta^steps)

``SaliencyTracker.update()`` reads ``p.grad`` and ``p.data`` after a backward (after the DDP
all-reduce, and after a GradScaler's ``unscale_``). Per weight matrix it does one elementwise
product, one in-place square and, for each, a row and/or a column reduction, one per group type
that owns that dimension (``ownership`` says which); rows of q/k/v and columns of o_proj are
folded per KV-head group with a reshape. No Python loop over channels, no host synchronization,
EMAs in float32 whatever the model dtype.

With ``fisher="per_token"`` (the default) the squared term is multiplied by N, the number of
tokens the gradient averages over, so that B estimates the empirical Fisher E[g^2] over tokens
rather than the square of a mean over N tokens (about N times smaller; see ``config``). N is
counted by a forward pre-hook on the decoder (forward passes with autograd enabled, summed over
micro-batches since the last update, times the world size under torch.distributed), or given
as ``update(tokens=N)``.

``mode="mean"`` turns the EMA into a plain running mean (beta_t = 1 - 1/t), which is what
one-shot pruning accumulates over its calibration batches.

Groups of different types share weights (column c of gate_proj row j is in FFN channel j and in
stem channel c). When one of them is removed, the other keeps the history of the removed
weights in its EMA; the EMA forgets it within ~1/(1-beta) steps. Exact bookkeeping would need a
per-weight EMA (two extra copies of the model); we do not pay for it.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .config import FISHER_ESTIMATES
from .groups import GroupType
from .ownership import ATTENTION, FFN, STEM, block_parts, outer_parts, units

F32 = torch.float32
log = logging.getLogger(__name__)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


TOKENS_ATTR = "_effllm_saliency_tokens"
HOOK_ATTR = "_effllm_saliency_hook"


def _count_tokens(module, args, kwargs) -> None:
    """Forward pre-hook on the decoder: adds the tokens of a forward that builds a graph to a module attribute.

    A plain function and a plain attribute, so a deep copy of the model counts for itself.
    """
    if not torch.is_grad_enabled():
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is not None:
        n = ids.numel()
    elif kwargs.get("inputs_embeds") is not None:
        n = kwargs["inputs_embeds"].shape[:-1].numel()
    else:
        return
    setattr(module, TOKENS_ATTR, getattr(module, TOKENS_ATTR, 0) + int(n))


def install_token_counter(decoder) -> None:
    """Count training tokens on ``decoder`` (once per module, however many trackers use it)."""
    if getattr(decoder, HOOK_ATTR, None) is None:
        setattr(decoder, HOOK_ATTR, decoder.register_forward_pre_hook(_count_tokens, with_kwargs=True))
        setattr(decoder, TOKENS_ATTR, 0)


def remove_token_counter(decoder) -> None:
    handle = getattr(decoder, HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(decoder, HOOK_ATTR, None)


def take_token_count(decoder) -> int:
    """Tokens counted since the last call (and reset)."""
    n = getattr(decoder, TOKENS_ATTR, 0)
    setattr(decoder, TOKENS_ATTR, 0)
    return n


def _gw(p: torch.Tensor | None, scratch=None) -> torch.Tensor | None:
    """g*w in float32, or None when the parameter has no gradient.

    ``scratch(shape, device)`` may lend a reusable float32 buffer (on CPU a fresh large tensor
    costs page faults every step; CUDA's caching allocator makes a new one free).
    """
    if p is None or p.grad is None:
        return None
    g, w = p.grad, p.detach()
    buf = scratch(g.shape, g.device) if scratch is not None else None
    if buf is None:
        if g.dtype != F32 or w.dtype != F32:
            return g.to(F32) * w.to(F32)
        return g * w
    if g.dtype == F32 and w.dtype == F32:
        return torch.mul(g, w, out=buf)
    buf.copy_(g)
    return buf.mul_(w)  # promoted to float32 element by element


def _sums(p: torch.Tensor, dims, scratch=None):
    """Per owned dimension, the sums of g*w and of (g*w)^2 over the other one: [(a, b), ...], or None."""
    if p.dim() == 1:  # a vector: its entries are the units (no scratch: ``a`` is the product itself)
        prod = _gw(p)
        return None if prod is None else [(prod, prod * prod)]
    prod = _gw(p, scratch)
    if prod is None:
        return None
    a = [prod.sum(1 - d) for d in dims]
    prod.square_()
    return list(zip(a, [prod.sum(1 - d) for d in dims]))


class SaliencyTracker:
    """EMAs of sum(g*w) and sum((g*w)^2) for every attention group, FFN channel and stem channel."""

    def __init__(self, model, beta: float = 0.99, mode: str = "ema", fisher: str = "per_token"):
        if mode not in ("ema", "mean"):
            raise ValueError(f"mode must be 'ema' or 'mean' (got {mode!r})")
        if fisher not in FISHER_ESTIMATES:
            raise ValueError(f"fisher must be one of {FISHER_ESTIMATES} (got {fisher!r})")
        self.model = model
        self.beta = float(beta)
        self.mode = mode
        self.fisher = fisher
        self.count = 0
        if fisher != "minibatch":
            install_token_counter(model.model)
        self._warned = False
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._allocate()

    def _scratch(self, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """A reusable float32 buffer of ``shape`` on CPU (None elsewhere: allocation is cheap there)."""
        if device.type != "cpu":
            return None
        n = shape.numel()
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=F32, device=device)
            self._buffers[device] = buf
        return buf[:n].view(shape)

    def close(self) -> None:
        """Remove the token-counting hook from the model (shared by every tracker of that model)."""
        remove_token_counter(self.model.model)

    # ---- storage --------------------------------------------------------------------------------
    def _layer_device(self, layer) -> torch.device:
        for p in layer.parameters():
            return p.device
        return self._stem_device()

    def _stem_device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def _allocate(self) -> None:
        inner = self.model.model
        d = inner.embed_tokens.weight.shape[1]
        dev = self._stem_device()
        self.stem_a = torch.zeros(d, dtype=F32, device=dev)
        self.stem_b = torch.zeros(d, dtype=F32, device=dev)
        self.attn_a, self.attn_b, self.ffn_a, self.ffn_b = [], [], [], []
        for layer in inner.layers:
            ldev = self._layer_device(layer)
            n = units(layer)
            k, f = n[ATTENTION], n[FFN]
            self.attn_a.append(torch.zeros(k, dtype=F32, device=ldev))
            self.attn_b.append(torch.zeros(k, dtype=F32, device=ldev))
            self.ffn_a.append(torch.zeros(f, dtype=F32, device=ldev))
            self.ffn_b.append(torch.zeros(f, dtype=F32, device=ldev))
        n = len(inner.layers)
        # sum over the down_proj bias: it leaves with a layer's last FFN channel (mlp_bias models only)
        self.extra_a = torch.zeros(n, dtype=F32, device=dev)
        self.extra_b = torch.zeros(n, dtype=F32, device=dev)

    def reset(self, mode: str | None = None) -> None:
        """Forget every statistic (and the tokens counted so far), at the model's current shapes;
        ``mode`` switches between "ema" and "mean" (a calibration pass accumulates a plain mean)."""
        if mode is not None:
            if mode not in ("ema", "mean"):
                raise ValueError(f"mode must be 'ema' or 'mean' (got {mode!r})")
            self.mode = mode
        self.count = 0
        take_token_count(self.model.model)  # training forwards since the last update are not this statistic's
        self._allocate()

    # ---- the update after each backward ---------------------------------------------------------
    def fisher_tokens(self, tokens: int | None) -> int:
        """N for this update: given, or counted since the last update (times the world size)."""
        counted = take_token_count(self.model.model)
        if self.fisher == "minibatch":
            return 1
        if tokens is not None:
            return max(int(tokens), 1)
        if counted == 0:
            if not self._warned:
                self._warned = True
                log.warning(
                    "saliency: no training forward seen since the last update; pass update_saliency(tokens=N) "
                    "(tokens per optimizer step); using N=1"
                )
            return 1
        return counted * _world_size()

    @torch.no_grad()
    def update(self, tokens: int | None = None) -> bool:
        """Fold the current gradients into the statistics; False (and no change) when no parameter has one.

        ``tokens``: how many tokens the gradient averages over (all micro-batches and ranks); counted
        automatically when None.
        """
        inner = self.model.model
        n_tokens = self.fisher_tokens(tokens)
        if not any(p.grad is not None for p in self.model.parameters()):
            return False
        stem = (torch.zeros_like(self.stem_a), torch.zeros_like(self.stem_b))
        extra_a = torch.zeros_like(self.extra_a)
        extra_b = torch.zeros_like(self.extra_b)
        new_attn, new_ffn = [], []

        def fold(parts, acc: dict):
            """Add each part's sums to the (a, b) of the group types that own it; returns a block bias's (a, b)."""
            bias = None
            for part in parts:
                sums = _sums(part.param, [axis.dim for axis in part.axes], self._scratch)
                if sums is None:
                    continue
                for axis, (a, b) in zip(part.axes, sums):
                    if axis.width > 1:  # rows/columns -> their KV-head groups
                        a, b = a.view(-1, axis.width).sum(1), b.view(-1, axis.width).sum(1)
                    into = acc[axis.owner]
                    into[0].add_(a.to(into[0].device))
                    into[1].add_(b.to(into[1].device))
                if part.block_bias:
                    bias = sums[0]
            return bias

        fold(outer_parts(self.model), {STEM: stem})
        for i, layer in enumerate(inner.layers):
            for kind, new, bufs in ((ATTENTION, new_attn, self.attn_a), (FFN, new_ffn, self.ffn_a)):
                parts = block_parts(layer, i, kind)
                if not parts:
                    new.append(None)
                    continue
                acc = {kind: (torch.zeros_like(bufs[i]), torch.zeros_like(bufs[i])), STEM: stem}
                bias = fold(parts, acc)
                if bias is not None and kind == FFN:  # the down_proj bias goes with the last channel (o_proj has none)
                    extra_a[i], extra_b[i] = bias[0].sum(), bias[1].sum()
                new.append(acc[kind])
        sa, sb = stem

        if self.fisher == "group":
            # The group's own quadratic form w_G^T F w_G = E[(g . w_G)^2]: the square of the summed
            # first-order term, not the sum of its squares (see the module docstring).
            sb, extra_b = sa * sa, extra_a * extra_a
            new_attn = [None if t is None else (t[0], t[0] * t[0]) for t in new_attn]
            new_ffn = [None if t is None else (t[0], t[0] * t[0]) for t in new_ffn]
        self.count += 1
        beta = self.beta if self.mode == "ema" else 1.0 - 1.0 / self.count
        keep = 1.0 - beta
        keep_b = keep * n_tokens  # the Fisher term: squared mini-batch gradient times the tokens it averages

        def ema(buf: torch.Tensor, new: torch.Tensor, alpha: float = keep) -> None:
            buf.mul_(beta).add_(new, alpha=alpha)

        ema(self.stem_a, sa)
        ema(self.stem_b, sb, keep_b)
        ema(self.extra_a, extra_a)
        ema(self.extra_b, extra_b, keep_b)
        for i in range(len(inner.layers)):
            if new_attn[i] is not None:
                ema(self.attn_a[i], new_attn[i][0])
                ema(self.attn_b[i], new_attn[i][1], keep_b)
            if new_ffn[i] is not None:
                ema(self.ffn_a[i], new_ffn[i][0])
                ema(self.ffn_b[i], new_ffn[i][1], keep_b)
        return True

    # ---- reading the scores ---------------------------------------------------------------------
    def correction(self) -> float:
        """Bias correction of the EMA (1 / (1 - beta^steps)); 1 for the running mean."""
        if self.mode == "mean" or self.count == 0:
            return 1.0
        return 1.0 / (1.0 - self.beta**self.count)

    def scores(self, order: int = 2) -> dict:
        """Saliency per unit, as float64 numpy arrays on the host (one device transfer).

        ``order=1`` keeps only the first-order term (the one-shot baseline's alternative score).
        Keys: ``attention`` and ``ffn`` (lists with one array per layer), ``stem`` (array),
        ``ffn_extra`` (per layer: the down_proj bias term, added when a layer's last FFN channel goes).
        """
        parts_a = [self.stem_a, self.extra_a, *self.attn_a, *self.ffn_a]
        parts_b = [self.stem_b, self.extra_b, *self.attn_b, *self.ffn_b]
        dev = self.stem_a.device
        a = torch.cat([t.to(dev) for t in parts_a])
        b = torch.cat([t.to(dev) for t in parts_b])
        taylor = -a + 0.5 * b if order == 2 else -a  # order 1: LLM-Pruner's first-order |g . w_G|
        s = (taylor.abs() * self.correction()).double().cpu().numpy()
        out, pos = {}, 0

        def take(n):
            nonlocal pos
            chunk = s[pos : pos + n]
            pos += n
            return chunk

        out["stem"] = take(self.stem_a.numel())
        out["ffn_extra"] = take(self.extra_a.numel())
        out["attention"] = [take(t.numel()) for t in self.attn_a]
        out["ffn"] = [take(t.numel()) for t in self.ffn_a]
        return out

    # ---- surgery --------------------------------------------------------------------------------
    def keep(self, kind: GroupType, layer: int | None, keep: torch.Tensor) -> None:
        """Slice the statistics to the surviving units (``keep``: current positions, ascending)."""
        if kind == GroupType.STEM:
            idx = keep.to(self.stem_a.device)
            self.stem_a, self.stem_b = self.stem_a[idx], self.stem_b[idx]
            return
        bufs_a, bufs_b = (self.attn_a, self.attn_b) if kind == GroupType.ATTENTION else (self.ffn_a, self.ffn_b)
        idx = keep.to(bufs_a[layer].device)
        bufs_a[layer], bufs_b[layer] = bufs_a[layer][idx], bufs_b[layer][idx]
        if kind == GroupType.FFN and idx.numel() == 0:
            self.extra_a[layer] = 0.0
            self.extra_b[layer] = 0.0

    def shapes(self) -> dict:
        return {
            "hidden": self.stem_a.numel(),
            "kv_heads": [t.numel() for t in self.attn_a],
            "ffn": [t.numel() for t in self.ffn_a],
        }

    def state_dict(self) -> dict:
        cpu = lambda t: t.detach().cpu().clone()
        return {
            "beta": self.beta,
            "mode": self.mode,
            "fisher": self.fisher,
            "count": self.count,
            "stem_a": cpu(self.stem_a),
            "stem_b": cpu(self.stem_b),
            "extra_a": cpu(self.extra_a),
            "extra_b": cpu(self.extra_b),
            "attn_a": [cpu(t) for t in self.attn_a],
            "attn_b": [cpu(t) for t in self.attn_b],
            "ffn_a": [cpu(t) for t in self.ffn_a],
            "ffn_b": [cpu(t) for t in self.ffn_b],
        }

    def load_state_dict(self, sd: dict) -> None:
        mine = self.shapes()
        theirs = {
            "hidden": sd["stem_a"].numel(),
            "kv_heads": [t.numel() for t in sd["attn_a"]],
            "ffn": [t.numel() for t in sd["ffn_a"]],
        }
        if mine != theirs:
            raise ValueError(
                f"saliency state is for shapes {theirs} but the model has {mine}; "
                "load the checkpoint's weights into the model before the pruner state"
            )
        self.mode = sd.get("mode", self.mode)
        self.count = int(sd["count"])
        self.beta = float(sd.get("beta", self.beta))
        to = lambda t, like: t.to(device=like.device, dtype=F32).clone()
        self.stem_a, self.stem_b = to(sd["stem_a"], self.stem_a), to(sd["stem_b"], self.stem_b)
        self.extra_a, self.extra_b = to(sd["extra_a"], self.extra_a), to(sd["extra_b"], self.extra_b)
        self.attn_a = [to(t, o) for t, o in zip(sd["attn_a"], self.attn_a)]
        self.attn_b = [to(t, o) for t, o in zip(sd["attn_b"], self.attn_b)]
        self.ffn_a = [to(t, o) for t, o in zip(sd["ffn_a"], self.ffn_a)]
        self.ffn_b = [to(t, o) for t, o in zip(sd["ffn_b"], self.ffn_b)]


__all__ = ["SaliencyTracker"]
