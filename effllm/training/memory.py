"""How much memory a training run needs at its peak, per device, before it starts.

Memory per device: the estimates below are for the peak, at the source size (pruning only
shrinks the model), with effllm's training setup: fp32 master weights, bf16 autocast on GPUs,
AdamW, one micro-batch of ``batch_size`` x ``seq_len`` tokens. ``P`` is the parameter count,
``L`` the layers, ``h`` the hidden size, ``q = heads * head_dim``, ``k = kv_heads * head_dim``,
``f`` the FFN width, ``V`` the vocabulary, ``T = batch_size * seq_len`` the tokens of a
micro-batch, ``W`` the world size.

* weights ``4P``; gradients ``4P``; AdamW ``8P`` (two fp32 moments).
* DDP gradient buckets ``4P`` (DDP copies gradients into flat buckets for the all-reduce).
* saliency state: two fp32 moving averages per group (KV groups, FFN channels, hidden channels),
  ``8 * (sum_layers(kv_heads + f) + h + L)``, plus a transient fp32 product of the largest
  weight matrix and its square, ``8 * max_matrix``.
* activations per token and layer, bytes, as autograd saves them under bf16 autocast with a
  fused (flash / memory-efficient) attention kernel: fp32 inputs of the two RMSNorms ``2 * 4h``,
  their bf16 outputs ``2 * 2h``, q/k/v projections ``2(q + 2k)``, rotated q/k ``2(q + k)``, the
  attention output ``2q``, and the SwiGLU FFN's gate, up, silu(gate) and product ``4 * 2f``:
  ``A = 12h + 6q + 6k + 8f``; in all ``L * A * T``. With --gradient-checkpointing only each
  layer's fp32 input is kept, ``4h * L * T``, plus one layer's ``A * T`` while it is recomputed.
* logits: bf16 logits, their fp32 copy and the fp32 log-softmax kept for backward, ``10 V T``.
  At a 49K-152K vocabulary this is often the largest single term.
* --distill: the teacher's fp32 weights ``4 P_t`` (no gradients, no optimizer state), its logits
  ``4 V T`` and the KD loss's per-chunk fp32 temporaries (three of ``distill.CHUNK_ELEMENTS``);
  its activations are freed layer by layer (no autograd graph).
* FSDP2 (``fully_shard`` per decoder layer): weights, gradients and AdamW state are divided by
  ``W``: ``16P / W``; add the unsharded working set, the current and the prefetched layer's full
  fp32 parameters and one layer's full gradients ``3 * 4 * layer_params``, and the embedding /
  LM head, which is gathered whole while it is used: ``8 * V * h``. Activations and logits are
  per device as for DDP.

A device also holds the CUDA context and allocator slack (a few GiB, not counted).

On a CPU (``--plan-device cpu``, the default where no GPU is visible and one process is planned)
effllm trains in fp32 without autocast, and the peak is the process's resident memory: weights,
gradients and AdamW as above; activations in fp32 as autograd saves them with PyTorch's CPU flash
attention: per RMSNorm its input, normalized input and output ``3 * 4h``; the rotated queries, the
keys and values repeated to every query head (a copy when heads > KV heads), the attention output
and its transposed copy for o_proj ``4(3q + 2k')`` with ``k' = q`` under GQA, else ``k``; gate, up,
silu(gate) and their product ``4 * 4f``: ``A_cpu = 24h + 12q + 8k' + 16f``; the fp32 logits, the
log-softmax and its gradient ``12 V T`` (measured: 12.2 V T); and the process itself (Python, torch,
transformers, the tokenizer: PROCESS_BYTES). The phases do not overlap as the GPU sums assume: the
backward's peak holds only the first gradient (the embedding / LM head's, ``4Vh``), while the saliency
update (``8 * max_matrix``) and AdamW's foreach temporaries (``4P``) come after the activations are
freed, so the gradients term is what the larger phase adds, ``max(act + logits + 4Vh, 4P + max(8 *
max_matrix, 4P)) - act - logits``, and the saliency term is the moving averages alone.
Measured peaks (/usr/bin/time, one run each): SmolLM2-135M at 16 x 256 tokens 10.3 GiB (the plan:
10.1 GiB), the quickstart 1.11 GiB (the plan: 1.0 GiB); one bare training step of a Qwen2.5-0.5B
shape at 4 x 256 tokens (random weights) 10.8 GiB (the plan: 11.0 GiB).

"""

from __future__ import annotations

import math
from dataclasses import dataclass

from effllm.model.params import count_parameters
from effllm.training.recipe import TrainConfig

GIB = 1 << 30
# Resident memory of a training process before the model: Python, torch, transformers and effllm imported
# (0.41 GB measured on Linux), the tokenizer and data buffers.
PROCESS_BYTES = GIB // 2


@dataclass
class Memory:
    """Bytes per device at the peak (the source size), by part."""

    weights: int
    gradients: int
    adamw: int
    saliency: int
    activations: int
    logits: int
    ddp_buckets: int = 0
    fsdp_working_set: int = 0
    teacher: int = 0
    process: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.adamw + self.saliency + self.activations + self.logits
                + self.ddp_buckets + self.fsdp_working_set + self.teacher + self.process)  # fmt: skip


def activation_bytes_per_token_layer(h: int, q: int, k: int, f: int) -> int:
    """``A = 12h + 6q + 6k + 8f`` (see the module docstring)."""
    return 12 * h + 6 * q + 6 * k + 8 * f


def cpu_activation_bytes_per_token_layer(h: int, q: int, k: int, f: int) -> int:
    """``A_cpu = 24h + 12q + 8k' + 16f``, ``k' = q`` when keys are repeated (GQA), else ``k``."""
    attention = 12 * h + 12 * q + 8 * (q if k < q else k) if q else 0
    return attention + (12 * h + 16 * f if f else 0)


def memory(config, cfg: TrainConfig, world_size: int, fsdp: bool, teacher=None, device: str = "gpu") -> Memory:
    """Peak bytes per device for ``config`` (see the module docstring for every term); ``teacher``:
    the --distill teacher's config; ``device`` "cpu": one fp32 process, its resident memory."""
    from effllm.training.distill import CHUNK_ELEMENTS

    count = count_parameters(config)
    p = count.total
    h, v, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    shapes = config.layer_shapes()
    hd = config.head_dim
    tokens = cfg.batch_size * cfg.seq_len
    per_token_layer = cpu_activation_bytes_per_token_layer if device == "cpu" else activation_bytes_per_token_layer
    per_layer = [per_token_layer(h, heads * hd, kv * hd, ffn) for heads, kv, ffn in shapes]
    if cfg.gradient_checkpointing:
        activations = (4 * h * n_layers + max(per_layer, default=0)) * tokens
    else:
        activations = sum(per_layer) * tokens
    groups = sum(kv + ffn for _, kv, ffn in shapes) + h + n_layers
    largest = max([v * h] + [max(h * heads * hd, h * ffn) for heads, _, ffn in shapes])
    saliency = 8 * groups + 8 * largest
    logits = (12 if device == "cpu" else 10) * v * tokens
    kd = 0 if teacher is None else 4 * count_parameters(teacher).total + 4 * v * tokens + 3 * 4 * CHUNK_ELEMENTS
    if device == "cpu":
        # One phase at a time: the backward's peak holds the activations, the logits' terms and the first
        # gradient (the embedding / LM head's); the saliency update and the optimizer step come after the
        # activations are freed, with every gradient and their own temporaries.
        backward = activations + logits + 4 * v * h
        after_backward = 4 * p + max(8 * largest, 4 * p)
        gradients = max(backward, after_backward) - activations - logits
        return Memory(4 * p, gradients, 8 * p, 8 * groups, activations, logits, teacher=kd, process=PROCESS_BYTES)
    if not fsdp:
        return Memory(4 * p, 4 * p, 8 * p, saliency, activations, logits,
                      ddp_buckets=4 * p if world_size > 1 else 0, teacher=kd)  # fmt: skip
    layer_params = max((count.attention + count.ffn) // max(n_layers, 1), 1)
    shard = math.ceil(p / world_size)
    working = 3 * 4 * layer_params + 8 * v * h
    return Memory(4 * shard, 4 * shard, 8 * shard, saliency, activations, logits, fsdp_working_set=working, teacher=kd)


def machine_memory_gib() -> float:
    """This machine's physical memory (what a CPU run's resident set must fit in)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def cpu_memory_warning(config, cfg: TrainConfig, teacher=None) -> str | None:
    """One line when a CPU run of ``config`` will not fit this machine's memory (said before it starts)."""
    need = memory(config, cfg, 1, False, teacher, device="cpu").total
    have = machine_memory_gib() * GIB
    if need <= have:
        return None
    return (
        f"this run needs about {gib(need)} of memory at its peak (effllm-train --dry-run shows the parts) and this "
        f"machine has {gib(int(have))}: expect swapping or the OOM killer; lower --batch-size and raise --grad-accum, "
        "add --gradient-checkpointing, or use a GPU"
    )


def gib(n: int) -> str:
    return f"{n / GIB:,.1f} GiB"


__all__ = ["GIB", "Memory", "activation_bytes_per_token_layer", "cpu_activation_bytes_per_token_layer",
           "cpu_memory_warning", "machine_memory_gib", "memory"]  # fmt: skip
