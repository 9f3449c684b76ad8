"""Knowledge distillation (--distill) and the training objective every step and calibration pass uses.

The teacher is the frozen source (or --teacher, which must share its tokenizer): in eval mode,
without gradients, outside the optimizer and outside checkpoints (it is deterministic, so a
resumed run reloads it from its path and stays bitwise equal). Under torchrun every rank loads
its own copy; it is never wrapped in DDP.

The KD term is the forward KL(teacher || student) of the next-token distributions at temperature
T, averaged over positions and multiplied by T^2 (so its gradients keep their scale as T changes,
Hinton et al. 2015): ``T^2 / N * sum_n KL(softmax(t_n / T) || softmax(s_n / T))``. It is computed
in chunks of positions by ``ChunkedKL``, which keeps only its inputs for backward and recomputes
both softmaxes per chunk there, so the (tokens x vocab) temporaries of softmax, log-softmax and
their product never exist for all positions at once (they would double the logits' peak memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effllm.training.plan import TrainError
from effllm.training.recipe import TrainConfig

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in fp32): small next to the logits, large enough to be fast


def check_config(cfg: TrainConfig) -> None:
    """The distillation flags, before anything is loaded or written."""
    if cfg.teacher and not cfg.distill:
        raise TrainError(f"--teacher {cfg.teacher} is used only with --distill; add --distill or drop --teacher")
    if not cfg.distill:
        return
    if cfg.init_config and not cfg.teacher:
        raise TrainError("--distill with --init-config has no source to learn from; name one with --teacher DIR")
    if not cfg.distill_temperature > 0:
        raise TrainError(f"--distill-temperature must be > 0 (got {cfg.distill_temperature}); 1 is the plain softmax")
    if not 0 <= cfg.distill_weight <= 1:
        raise TrainError(
            f"--distill-weight must lie in [0, 1] (got {cfg.distill_weight}): loss = w * KD + (1 - w) * LM"
        )


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 at least: bf16 logits lose too much in a softmax over the vocabulary."""
    return torch.promote_types(logits.dtype, torch.float32)


def _chunk(n_vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(n_vocab, 1))


class ChunkedKL(torch.autograd.Function):
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)), for [N, V] logits;
    the gradient flows to the student logits only."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk: int):
        dt = _compute_dtype(student)
        total = torch.zeros((), dtype=dt, device=student.device)
        for s, t in zip(student.split(chunk), teacher.split(chunk)):
            log_p = F.log_softmax(t.to(dt) / temperature, dim=-1)
            log_q = F.log_softmax(s.to(dt) / temperature, dim=-1)
            total += (log_p.exp() * (log_p - log_q)).sum()
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total * (temperature**2 / student.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        out = torch.empty_like(student)
        # d/ds of T^2/N * KL = T^2/N * (q - p) / T
        dt = _compute_dtype(student)
        scale = grad.to(dt) * (temperature / student.shape[0])
        for g, s, t in zip(out.split(chunk), student.split(chunk), teacher.split(chunk)):
            q = F.softmax(s.to(dt) / temperature, dim=-1)
            q -= F.softmax(t.to(dt) / temperature, dim=-1)
            g.copy_(q.mul_(scale))
        return out, None, None, None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, chunk: int | None = None):
    """The KD term for [N, V] (or [..., V]) logits; ``chunk``: rows per chunk (default ~4M logits)."""
    v = student.shape[-1]
    student, teacher = student.reshape(-1, v), teacher.reshape(-1, v).detach()
    return ChunkedKL.apply(student, teacher, float(temperature), chunk or _chunk(v))


@dataclass
class Distiller:
    """The teacher and how its logits enter the loss."""

    teacher: torch.nn.Module
    temperature: float
    weight: float  # of the KD term; the LM loss gets 1 - weight


def training_loss(net, ids: torch.Tensor, autocast, distill: Distiller | None = None) -> torch.Tensor:
    """The loss a training step (and a calibration pass) differentiates for a [B, T+1] batch: the
    next-token cross-entropy, or with ``distill`` w * KD + (1 - w) * LM."""
    inputs, labels = ids[:, :-1], ids[:, 1:].flatten()
    with autocast():
        logits = net(inputs, use_cache=False).logits.flatten(0, 1)
    if distill is None:
        return F.cross_entropy(logits.float(), labels)
    with torch.no_grad(), autocast():
        target = distill.teacher(inputs, use_cache=False).logits.flatten(0, 1)
    loss = kd_loss(logits, target, distill.temperature)
    if distill.weight < 1:
        loss = distill.weight * loss + (1 - distill.weight) * F.cross_entropy(logits.float(), labels)
    return loss


def load_teacher(cfg: TrainConfig, tokenizer, vocab_size: int, device) -> Distiller | None:
    """The frozen teacher on ``device`` (None without --distill); a TrainError when its vocabulary
    is not the student's (``tokenizer``, ``vocab_size``)."""
    if not cfg.distill:
        return None
    from effllm.model.convert import UnsupportedSourceError, from_pretrained

    where = cfg.teacher or cfg.source
    flag = f"--teacher {where}" if cfg.teacher else f"the teacher (the source {where})"
    try:
        teacher, teacher_tokenizer = from_pretrained(where, dtype=torch.float32)
    except UnsupportedSourceError as err:
        raise TrainError(f"{flag}: {err}") from None
    except OSError as err:
        raise TrainError(f"{flag} cannot be loaded ({str(err).splitlines()[0]}); check the path") from None
    same = teacher.config.vocab_size == vocab_size
    if same and teacher_tokenizer is not None and tokenizer is not None:
        same = teacher_tokenizer.get_vocab() == tokenizer.get_vocab()
    if not same:
        raise TrainError(
            f"{flag} has another vocabulary ({teacher.config.vocab_size:,} tokens; the student has {vocab_size:,}"
            f"{' with other tokens' if teacher.config.vocab_size == vocab_size else ''}); distillation compares "
            "logits token by token: use a teacher with the source's tokenizer"
        )
    teacher.to(device).eval().requires_grad_(False)
    return Distiller(teacher, cfg.distill_temperature, cfg.distill_weight)


__all__ = ["ChunkedKL", "Distiller", "check_config", "kd_loss", "load_teacher", "training_loss"]
