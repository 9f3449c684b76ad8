"""Pruning settings, their defaults, and why (the trainer's --help quotes this text).

Defaults
--------
granularity = 32
    A FFN or stem (hidden) group is the 32 least salient channels of one layer (FFN) or of the
    residual stream (stem), so every width that started as a multiple of 32 stays one (a width
    that did not first loses its remainder). 32 is the block of every 4-bit and 8-bit format the
    exports write (onnx int4 and ExecuTorch 8da4w groups, llama.cpp's q4_0/q8_0 blocks): at odd
    widths those tensors fall back to wider types. Measured on SmolLM2-135M pruned to 0.7: the
    same held-out perplexity at 32 as at 1 (62.37 against 62.63), q8_0/q4_0/q4_k_m files 11-21%
    smaller and faster to decode. 1 prunes single channels, as in the paper. Channel order
    carries no meaning in a transformer, so the block is chosen by saliency, not by position.
    Attention groups are always one KV head with its query heads.
ema_beta = 0.99
    Saliency EMAs average about 1/(1-beta) = 100 optimizer steps: long enough to smooth single
    mini-batch gradients, short enough to follow the model as it shrinks (docs/method.md). Reported
    saliencies are bias-corrected, so early values are not biased towards zero.
min_heads_per_layer = 0, min_ffn_per_layer = 0
    No per-layer floor: the method lets saliency design the architecture, and a layer may become
    FFN-only or attention-only (the model format runs such layers). Set a floor when a
    deployment target needs one (e.g. a runtime that wants every layer to keep attention). The
    head floor counts query heads; it is met in whole KV groups (multiples of heads/kv_heads).
min_hidden_size = None
    No floor beyond keeping the model runnable: the hidden size never drops below one granule
    (32 channels at the default granularity). In the paper the hidden size is pruned last and
    least (to ~42% of the source), because a stem channel is by far the largest group and so
    rarely the least dense; a floor here is a deployment choice, not a method one.
fisher = "per_token"
    How the Fisher term B is estimated from training gradients. The method's F_i = E[g_i^2] is the
    empirical Fisher, an expectation over examples; the gradient of a mini-batch is a mean over its
    N tokens, so its square underestimates F by a factor of about N. "per_token" multiplies the
    squared mini-batch term by N, the number of tokens the gradient averages over (counted by a
    forward pre-hook on the model, summed over gradient-accumulation micro-batches, times the
    world size under torch.distributed; ``update_saliency(tokens=...)`` overrides the count).
    "minibatch" uses the squared mini-batch gradient as is. Measured on the Spearman test's
    setup (tiny model, 7 training runs, correlation of saliency with the loss increase of
    removing each group): "minibatch" 0.28-0.90 (attention), 0.41-0.75 (FFN), 0.75-0.85 (stem);
    "per_token" 0.85-0.99, 0.65-0.89, 0.87-0.94: with the unscaled term the noisy first-order term
    A decides the ranking.
weight_update = "none"
    Plain removal. "obs" applies the local second-order update (docs/method.md, "OBS") to the
    layers that consumed the removed groups, at the cost of one extra forward on the current batch
    and a Hessian inversion per affected layer at every prune step. During pruning-aware
    pretraining the optimizer keeps adapting the surviving weights anyway, and the method
    benchmark has not shown that OBS pays, so it is off until a measurement says otherwise.
stem_price = 1.0
    Selection multiplies the saliency of hidden (stem) channels by this factor. Measured on the method
    study's trained source (bench/results/stem_saliency.md): removing a hidden channel really costs
    2-5x more loss per parameter than an FFN channel or attention group, and the element-wise
    estimate overprices it by a further ~3x relative to FFN channels (the group-level Fisher and a
    single-cut estimate do not fix that). Values < 1 prune the hidden size earlier; 1 keeps the
    estimate as it is. The method study measures what ~0.3 (the measured overpricing) does.
shape = "irregular"
    Saliency designs each layer's shape, as in the paper. "uniform" removes the same groups' worth
    from every layer at once (each layer's least salient KV group, or its least salient FFN
    channels, chosen per layer by rank, priced by their summed saliency per parameter against the
    other moves), so every layer keeps one head count and FFN width and at least one KV group and
    one FFN granule: the result is a plain Llama / Qwen2 checkpoint that stock transformers, vLLM
    and llama.cpp's llama architecture run. The stem is global under both.
obs_damping = 0.01
    lambda = 1% of the mean diagonal of H = 2 X^T X (as in SparseGPT).

Hard guards (not settings): the last hidden granule is never removed, and neither is the model's
last attention group (a model without attention cannot use context and has no KV cache to
export). Explicit removals through ``Pruner.remove_groups`` skip the floors but not the guard on
the hidden size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

WEIGHT_UPDATES = ("none", "obs")
FISHER_ESTIMATES = ("per_token", "group", "minibatch")
TAYLOR_ORDERS = (1, 2)
SHAPES = ("irregular", "uniform")


@dataclass
class PruningConfig:
    granularity: int = 32
    ema_beta: float = 0.99
    min_heads_per_layer: int = 0
    min_ffn_per_layer: int = 0
    min_hidden_size: int | None = None
    weight_update: str = "none"
    obs_damping: float = 0.01
    fisher: str = "per_token"
    taylor_order: int = 2
    stem_price: float = 1.0
    shape: str = "irregular"

    def __post_init__(self) -> None:
        if int(self.granularity) < 1:
            raise ValueError(f"granularity must be >= 1 (got {self.granularity}); use 1 for single channels")
        if not 0.0 <= float(self.ema_beta) < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1) (got {self.ema_beta}); 0.99 averages ~100 steps")
        if self.min_heads_per_layer < 0 or self.min_ffn_per_layer < 0:
            raise ValueError("min_heads_per_layer and min_ffn_per_layer must be >= 0")
        if self.min_hidden_size is not None and self.min_hidden_size < 1:
            raise ValueError(f"min_hidden_size must be >= 1 or None (got {self.min_hidden_size})")
        if self.weight_update not in WEIGHT_UPDATES:
            raise ValueError(f"weight_update must be one of {WEIGHT_UPDATES} (got {self.weight_update!r})")
        if self.fisher not in FISHER_ESTIMATES:
            raise ValueError(f"fisher must be one of {FISHER_ESTIMATES} (got {self.fisher!r})")
        if self.taylor_order not in TAYLOR_ORDERS:
            raise ValueError(f"taylor_order must be 1 or 2 (got {self.taylor_order}); 2 is the method's score")
        if not self.stem_price > 0:
            raise ValueError(f"stem_price must be > 0 (got {self.stem_price}); 1 prices hidden channels as measured")
        if self.obs_damping <= 0:
            raise ValueError(f"obs_damping must be > 0 (got {self.obs_damping})")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES} (got {self.shape!r}); 'uniform' keeps every layer alike")
        self.granularity = int(self.granularity)

    def hidden_floor(self) -> int:
        """The smallest hidden size selection may leave: the floor, and never less than one granule."""
        return max(self.min_hidden_size or 0, 1)

    def layer_floors(self, group_size: int) -> tuple[int, int]:
        """(query heads, FFN channels) every layer keeps. Under shape "uniform" at least one KV group and
        one FFN channel too: a plain Llama layer has both."""
        if self.shape == "uniform":
            return max(self.min_heads_per_layer, group_size), max(self.min_ffn_per_layer, 1)
        return self.min_heads_per_layer, self.min_ffn_per_layer

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULTS_HELP = (
    "Defaults: granularity 32 (channels pruned in blocks of 32, the quantized formats' block; 1 is single channels, as in the paper); ema_beta 0.99 (~100-step saliency average); "
    "no per-layer floors (min heads 0, min FFN 0: saliency designs the architecture, layers may become "
    "FFN-only or attention-only; shape 'irregular', per-layer shapes from saliency); no hidden floor beyond one granule; Fisher term per token (the squared "
    "mini-batch gradient times the tokens it averages, i.e. the empirical Fisher); weight update 'none' (OBS costs a "
    "forward and a Hessian inversion per prune step and is unproven while training continues). The last "
    "hidden granule and the model's last attention group are never removed."
)
