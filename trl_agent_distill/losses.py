"""Span-weighted distillation loss (Structured Agent Distillation).

`lambda_reason * D_reason + lambda_act * D_act (+ lambda_ce * CE)`, where D is the per-token divergence
between the teacher's and the student's next-token distributions inside REASON and ACT spans. The
divergence is TRL's generalized JSD: `beta=0` is forward KL(teacher || student) as in the SAD paper,
`beta=1` reverse KL(student || teacher), anything between the JSD through the `beta` mixture.
Only trained positions are gathered before the softmax, so untrained positions (prompt,
observations, padding) cost no (tokens, vocab) temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPAN_NORMALIZATIONS = ("token", "span")


@dataclass
class SpanLossOutput:
    """The loss to backpropagate and its parts, for logging.

    `reason_sum` / `act_sum` / `ce_sum` are un-normalized sums over the local batch (detached), so callers can
    aggregate exact per-token means across batches and processes; `reason_tokens` / `act_tokens` count them.
    """

    loss: torch.Tensor
    reason_sum: torch.Tensor
    act_sum: torch.Tensor
    ce_sum: torch.Tensor
    reason_tokens: torch.Tensor
    act_tokens: torch.Tensor

    @property
    def kl_reason(self) -> float:
        return (self.reason_sum / self.reason_tokens.clamp_min(1)).item()

    @property
    def kl_act(self) -> float:
        return (self.act_sum / self.act_tokens.clamp_min(1)).item()


def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0, temperature: float = 1.0
) -> torch.Tensor:
    """Generalized JSD per row of `(N, V)` logits, summed over the vocabulary: shape `(N,)`, computed in float32."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    mixture_logp = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
    return beta * _kl(teacher_logp, mixture_logp) + (1.0 - beta) * _kl(student_logp, mixture_logp)


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; `xlogy`-style so zero-probability entries add nothing."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def span_divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    reason_mask: torch.Tensor,
    act_mask: torch.Tensor,
    lambda_reason: float = 1.0,
    lambda_act: float = 1.0,
    beta: float = 0.0,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    lambda_ce: float = 0.0,
    span_normalization: str = "token",
    span_token_counts: tuple[torch.Tensor | int, torch.Tensor | int] | None = None,
) -> SpanLossOutput:
    """Span-weighted divergence between aligned `(B, T, V)` logits (already shifted: position t predicts token t+1).

    Args:
        reason_mask, act_mask: `(B, T)` 0/1 masks of the positions whose next token is REASON / ACT. Disjoint.
        num_items_in_batch: global count of trained tokens across gradient-accumulation micro-batches (and
            processes). `"token"` normalization divides by it when given, else by the local trained-token count:
            with one mask equal to TRL's label mask and weight 1 this is exactly `GKDTrainer.generalized_jsd_loss`.
        labels: `(B, T)` target ids, needed when `lambda_ce > 0` (hard-label cross-entropy on the same spans at
            temperature 1; with both lambdas 0 it is plain SFT / imitation learning).
        span_normalization: `"token"` divides the weighted sum by the number of trained tokens; `"span"` averages
            inside each kind, so a short ACT span weighs as much as a long REASON span.
        span_token_counts: global `(reason, act)` counts for `"span"` normalization under gradient accumulation.
    """
    if span_normalization not in SPAN_NORMALIZATIONS:
        raise ValueError(f"span_normalization must be one of {SPAN_NORMALIZATIONS}, got {span_normalization!r}.")
    if student_logits.shape[:-1] != reason_mask.shape or reason_mask.shape != act_mask.shape:
        raise ValueError(
            f"Shapes disagree: logits {tuple(student_logits.shape)}, reason_mask {tuple(reason_mask.shape)}, "
            f"act_mask {tuple(act_mask.shape)}; masks must be (batch, tokens) and aligned with the shifted logits."
        )
    if lambda_ce > 0 and labels is None:
        raise ValueError("lambda_ce > 0 needs `labels` (the target token ids aligned with the logits).")

    is_reason = reason_mask.bool()
    is_act = act_mask.bool()
    if (is_reason & is_act).any():
        raise ValueError("reason_mask and act_mask overlap: a token belongs to at most one span kind.")
    trained = is_reason | is_act
    student_rows = student_logits[trained]
    row_is_reason = is_reason[trained]
    zero = student_logits.new_zeros((), dtype=torch.float32)

    lambda_kl = lambda_reason != 0.0 or lambda_act != 0.0
    if lambda_kl:
        divergence = token_divergence(student_rows, teacher_logits[trained], beta, temperature)
    else:
        divergence = zero.expand(student_rows.shape[0])
    reason_sum = divergence[row_is_reason].sum()
    act_sum = divergence[~row_is_reason].sum()
    ce = (
        F.cross_entropy(student_rows.float(), labels[trained], reduction="sum")
        if lambda_ce > 0
        else zero
    )

    local_reason, local_act = row_is_reason.sum(), (~row_is_reason).sum()
    total_tokens = num_items_in_batch if num_items_in_batch is not None else (local_reason + local_act)
    total_tokens = _as_denominator(total_tokens, zero)
    if span_normalization == "token":
        loss = (lambda_reason * reason_sum + lambda_act * act_sum) / total_tokens
    else:
        n_reason, n_act = span_token_counts if span_token_counts is not None else (local_reason, local_act)
        loss = lambda_reason * reason_sum / _as_denominator(n_reason, zero) + lambda_act * act_sum / _as_denominator(
            n_act, zero
        )
    loss = loss + lambda_ce * ce / total_tokens
    return SpanLossOutput(
        loss=loss,
        reason_sum=reason_sum.detach(),
        act_sum=act_sum.detach(),
        ce_sum=ce.detach(),
        reason_tokens=local_reason,
        act_tokens=local_act,
    )


def _as_denominator(count: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A count as a float tensor on the loss's device, at least 1 so an empty batch gives 0 instead of NaN."""
    return torch.as_tensor(count, dtype=torch.float32, device=like.device).clamp_min(1)
