"""Span-weighted distillation loss (Structured Agent Distillation).

`lambda_reason * D_reason + lambda_act * D_act (+ lambda_ce * CE)`, where D is the per-token divergence
between the teacher's and the student's next-token distributions inside REASON and ACT spans. The
divergence is TRL's generalized JSD: `beta=0` is forward KL(teacher || student) as in the SAD paper,
`beta=1` reverse KL(student || teacher), anything between the JSD through the `beta` mixture.

Two implementations with one weighting:
- `span_divergence_loss` works on logits (autograd; the reference, and the debugging path).
- `chunked_span_divergence_loss` works on final hidden states and the output heads, a chunk of positions at a
  time, with a custom autograd function that recomputes each chunk in backward: no (tokens, vocab) tensor of
  either model outlives a chunk.
Either accepts a dense teacher or a sparse one (`SparseTeacher`: cached top-k log-probabilities plus one bucket
for the remaining mass), in which case the student's distribution is collapsed onto the same k + 1 buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .heads import LogitHead

SPAN_NORMALIZATIONS = ("token", "span")


@dataclass
class SparseTeacher:
    """A teacher distribution per trained position: top-k token ids and log-probs, and the log of the rest."""

    topk_ids: torch.Tensor  # (N, k) long
    topk_logprobs: torch.Tensor  # (N, k) float
    tail_logprob: torch.Tensor  # (N,) float: log(1 - sum(exp(topk_logprobs)))

    def __getitem__(self, rows) -> SparseTeacher:
        return SparseTeacher(self.topk_ids[rows], self.topk_logprobs[rows], self.tail_logprob[rows])

    def logprobs(self) -> torch.Tensor:
        """(N, k + 1) log-probabilities: the top-k tokens, then the tail bucket."""
        return torch.cat([self.topk_logprobs.float(), self.tail_logprob.float().unsqueeze(-1)], dim=-1)


@dataclass
class DenseTeacher:
    """A teacher given by its final hidden states at the trained positions and its output head."""

    hidden: torch.Tensor  # (N, H_teacher)
    head: LogitHead

    def __getitem__(self, rows) -> DenseTeacher:
        return DenseTeacher(self.hidden[rows], self.head)


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


# ---------------------------------------------------------------------------------------------- divergences
def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0, temperature: float = 1.0
) -> torch.Tensor:
    """Generalized JSD per row of `(N, V)` logits, summed over the vocabulary: shape `(N,)`, computed in float32."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _divergence(student_logp, teacher_logp, beta)[0]


def sparse_token_divergence(
    student_logits: torch.Tensor, teacher: SparseTeacher, beta: float = 0.0, temperature: float = 1.0
) -> torch.Tensor:
    """Generalized JSD per row against a sparse teacher, over the k + 1 buckets: shape `(N,)`, float32."""
    student_logp = bucket_logprobs(student_logits.float() / temperature, teacher.topk_ids)
    return _divergence(student_logp, teacher.logprobs(), beta)[0]


def _divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float):
    """Divergence per row over the last dim, and `q * dD/dq` (q the student's probabilities) for the backward."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    # Row-wise dot products (vecdot) keep a chunk to a few (rows, vocab) temporaries; without autograd (the
    # chunked path) the gradient terms reuse them in place too.
    in_place = not torch.is_grad_enabled()
    if beta == 0.0:
        teacher_p = teacher_logp.exp()
        divergence = torch.linalg.vecdot(teacher_p, teacher_logp - student_logp)
        return divergence, teacher_p.neg_() if in_place else -teacher_p
    student_p = student_logp.exp()
    if beta == 1.0:
        log_ratio = student_logp - teacher_logp
        divergence = torch.linalg.vecdot(student_p, log_ratio)
        return divergence, log_ratio.add_(1.0).mul_(student_p) if in_place else student_p * (log_ratio + 1.0)
    teacher_p = teacher_logp.exp()
    mixture_logp = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
    divergence = beta * (teacher_p * (teacher_logp - mixture_logp)).sum(-1) + (1.0 - beta) * (
        student_p * (student_logp - mixture_logp)
    ).sum(-1)
    return divergence, (1.0 - beta) * student_p * (student_logp - mixture_logp)


def bucket_logprobs(scaled_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """(N, k + 1) log-probabilities of the tokens `topk_ids` and of everything else, from (N, V) logits."""
    log_norm = torch.logsumexp(scaled_logits, dim=-1, keepdim=True)
    topk = scaled_logits.gather(-1, topk_ids) - log_norm
    tail = torch.logsumexp(scaled_logits.scatter(-1, topk_ids, float("-inf")), dim=-1, keepdim=True) - log_norm
    return torch.cat([topk, tail], dim=-1)


# --------------------------------------------------------------------------------------------- weighting
def _row_weights(
    row_is_reason: torch.Tensor,
    lambda_reason: float,
    lambda_act: float,
    lambda_ce: float,
    span_normalization: str,
    num_items_in_batch,
    span_token_counts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weights of the divergence and of the cross-entropy, so that the loss is a plain weighted sum.

    "token": lambda_kind / trained tokens (global `num_items_in_batch` when given, else local);
    "span": lambda_kind / tokens of that kind (global `span_token_counts` when given, else local).
    Cross-entropy always averages over trained tokens.
    """
    local_reason = row_is_reason.sum()
    local_act = row_is_reason.numel() - local_reason
    reason_norm, act_norm, total = span_normalizers(
        local_reason, local_act, span_normalization, num_items_in_batch, span_token_counts
    )
    divergence_weight = torch.where(row_is_reason, lambda_reason / reason_norm, lambda_act / act_norm)
    return divergence_weight, (lambda_ce / total).expand(row_is_reason.shape)


def span_normalizers(
    local_reason: torch.Tensor,
    local_act: torch.Tensor,
    span_normalization: str = "token",
    num_items_in_batch: int | torch.Tensor | None = None,
    span_token_counts: tuple[torch.Tensor | int, torch.Tensor | int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the REASON and ACT divergence sums are divided by, and what the cross-entropy sum is divided by.

    From the local token counts of each kind and, when given, the global counts of the accumulation window (see
    `span_divergence_loss`); each at least 1, so an empty batch gives 0 instead of NaN.
    """
    if span_normalization not in SPAN_NORMALIZATIONS:
        raise ValueError(f"span_normalization must be one of {SPAN_NORMALIZATIONS}, got {span_normalization!r}.")
    device = local_reason.device
    total = _count(num_items_in_batch if num_items_in_batch is not None else local_reason + local_act, device)
    if span_normalization == "token":
        return total, total, total
    n_reason, n_act = span_token_counts if span_token_counts is not None else (local_reason, local_act)
    return _count(n_reason, device), _count(n_act, device), total


def _count(count, device) -> torch.Tensor:
    """A count as a float tensor, at least 1 so an empty batch gives 0 instead of NaN."""
    return torch.as_tensor(count, dtype=torch.float32, device=device).clamp_min(1)


def _trained_rows(reason_mask: torch.Tensor, act_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained positions (row-major, as boolean indexing orders them) and which of them are REASON."""
    is_reason, is_act = reason_mask.bool(), act_mask.bool()
    if (is_reason & is_act).any():
        raise ValueError("reason_mask and act_mask overlap: a token belongs to at most one span kind.")
    trained = is_reason | is_act
    return trained, is_reason[trained]


def _output(loss, divergence, cross_entropy, row_is_reason) -> SpanLossOutput:
    divergence, cross_entropy = divergence.detach(), cross_entropy.detach()
    reason_tokens = row_is_reason.sum()
    return SpanLossOutput(
        loss=loss,
        reason_sum=divergence[row_is_reason].sum(),
        act_sum=divergence[~row_is_reason].sum(),
        ce_sum=cross_entropy.sum(),
        reason_tokens=reason_tokens,
        act_tokens=row_is_reason.numel() - reason_tokens,
    )


# ------------------------------------------------------------------------------------------- logits path
def span_divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
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
        teacher_logits: `(B, T, V)` logits, or a `SparseTeacher` holding one row per trained position.
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
    if student_logits.shape[:-1] != reason_mask.shape or reason_mask.shape != act_mask.shape:
        raise ValueError(
            f"Shapes disagree: logits {tuple(student_logits.shape)}, reason_mask {tuple(reason_mask.shape)}, "
            f"act_mask {tuple(act_mask.shape)}; masks must be (batch, tokens) and aligned with the shifted logits."
        )
    if lambda_ce > 0 and labels is None:
        raise ValueError("lambda_ce > 0 needs `labels` (the target token ids aligned with the logits).")
    trained, row_is_reason = _trained_rows(reason_mask, act_mask)
    divergence_weight, ce_weight = _row_weights(
        row_is_reason, lambda_reason, lambda_act, lambda_ce, span_normalization, num_items_in_batch, span_token_counts
    )
    student_rows = student_logits[trained]
    zeros = student_rows.new_zeros(student_rows.shape[0], dtype=torch.float32)
    if lambda_reason == 0.0 and lambda_act == 0.0:
        divergence = zeros
    elif isinstance(teacher_logits, SparseTeacher):
        divergence = sparse_token_divergence(student_rows, teacher_logits, beta, temperature)
    else:
        divergence = token_divergence(student_rows, teacher_logits[trained], beta, temperature)
    cross_entropy = F.cross_entropy(student_rows.float(), labels[trained], reduction="none") if lambda_ce > 0 else zeros
    loss = (divergence_weight * divergence).sum() + (ce_weight * cross_entropy).sum()
    return _output(loss, divergence, cross_entropy, row_is_reason)


# ------------------------------------------------------------------------------------------ chunked path
def chunked_span_divergence_loss(
    student_hidden: torch.Tensor,
    student_head: LogitHead,
    teacher: DenseTeacher | SparseTeacher | None,
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
    chunk_size: int | None = None,
) -> SpanLossOutput:
    """`span_divergence_loss` from final hidden states `(B, T, H)` (aligned like the logits would be).

    Only the trained positions are projected through the head(s), `chunk_size` rows at a time (default: about
    2**25 / vocab rows, so a chunk of float32 logits stays near 128 MB). A dense teacher is given by its hidden
    states at the trained positions (`DenseTeacher`, rows in the order boolean indexing gives); a sparse one by
    cached rows (`SparseTeacher`); `None` only for pure cross-entropy.
    """
    if student_hidden.shape[:-1] != reason_mask.shape or reason_mask.shape != act_mask.shape:
        raise ValueError(
            f"Shapes disagree: hidden {tuple(student_hidden.shape)}, reason_mask {tuple(reason_mask.shape)}, "
            f"act_mask {tuple(act_mask.shape)}; masks must be (batch, tokens) and aligned with the hidden states."
        )
    uses_teacher = lambda_reason != 0.0 or lambda_act != 0.0
    if uses_teacher and teacher is None:
        raise ValueError("A divergence weight is non-zero but no teacher was given.")
    if lambda_ce > 0 and labels is None:
        raise ValueError("lambda_ce > 0 needs `labels` (the target token ids aligned with the hidden states).")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    trained, row_is_reason = _trained_rows(reason_mask, act_mask)
    divergence_weight, ce_weight = _row_weights(
        row_is_reason, lambda_reason, lambda_act, lambda_ce, span_normalization, num_items_in_batch, span_token_counts
    )
    targets = labels[trained] if labels is not None else torch.zeros_like(row_is_reason, dtype=torch.long)
    vocab = student_head.weight.shape[0]
    settings = _ChunkSettings(
        head=student_head,
        teacher=teacher if uses_teacher else None,
        beta=beta,
        temperature=temperature,
        chunk_size=chunk_size or max(1, 2**25 // vocab),
        with_ce=lambda_ce > 0,
    )
    bias = student_head.bias if student_head.bias is not None else student_head.weight.new_empty(0)
    loss, divergence, cross_entropy = _ChunkedSpanLoss.apply(
        student_hidden[trained], student_head.weight, bias, divergence_weight, ce_weight, targets, settings
    )
    return _output(loss, divergence, cross_entropy, row_is_reason)


@dataclass
class _ChunkSettings:
    head: LogitHead
    teacher: DenseTeacher | SparseTeacher | None
    beta: float
    temperature: float
    chunk_size: int
    with_ce: bool


def _chunk_terms(hidden, targets, divergence_weight, ce_weight, settings: _ChunkSettings, rows: slice, want_grad: bool):
    """Divergence and cross-entropy of one chunk of rows, and (if asked) d(weighted loss)/d(raw head output)."""
    head = settings.head
    logits = head.logits(hidden[rows])
    scaled = logits / settings.temperature if settings.temperature != 1.0 else logits
    grad_logits = None
    divergence = logits.new_zeros(logits.shape[0])
    if settings.teacher is not None:
        teacher = settings.teacher[rows]
        if isinstance(teacher, SparseTeacher):
            student_logp = bucket_logprobs(scaled, teacher.topk_ids)
            divergence, weighted_grad = _divergence(student_logp, teacher.logprobs(), settings.beta)
            grad_scaled = _sparse_grad_to_tokens(scaled, weighted_grad, teacher.topk_ids) if want_grad else None
        else:
            student_logp = F.log_softmax(scaled, dim=-1)
            teacher_logp = F.log_softmax(teacher.head.logits(teacher.hidden).div_(settings.temperature), dim=-1)
            divergence, weighted_grad = _divergence(student_logp, teacher_logp, settings.beta)
            del teacher_logp
            if want_grad:  # dD/dz = Gq - p * sum(Gq), with p = exp(log p) computed in place
                total = weighted_grad.sum(-1, keepdim=True)
                grad_scaled = student_logp.exp_().mul_(total.neg_()).add_(weighted_grad)
        if want_grad:
            grad_logits = grad_scaled.mul_((divergence_weight[rows] / settings.temperature).unsqueeze(-1))
    cross_entropy = logits.new_zeros(logits.shape[0])
    if settings.with_ce:
        logp = F.log_softmax(logits, dim=-1)
        cross_entropy = -logp.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
        if want_grad:
            grad_ce = logp.exp()
            grad_ce.scatter_add_(-1, targets[rows].unsqueeze(-1), -torch.ones_like(cross_entropy).unsqueeze(-1))
            grad_ce = grad_ce * ce_weight[rows].unsqueeze(-1)
            grad_logits = grad_ce if grad_logits is None else grad_logits + grad_ce
    if grad_logits is not None:
        grad_logits = head.transform_backward(grad_logits, logits)
    return divergence, cross_entropy, grad_logits


def _sparse_grad_to_tokens(scaled_logits, weighted_grad, ids) -> torch.Tensor:
    """dD/d(scaled logits) from `q * dD/dq` per bucket: `r * Gq[bucket] - p * sum(Gq)`, r = p / q[bucket]."""
    student_p = F.softmax(scaled_logits, dim=-1)
    total = weighted_grad.sum(-1, keepdim=True)
    tail_logits = scaled_logits.scatter(-1, ids, float("-inf"))
    share_of_tail = torch.exp(tail_logits - torch.logsumexp(tail_logits, dim=-1, keepdim=True))
    grad = share_of_tail * weighted_grad[:, -1:] - student_p * total
    return grad.scatter(-1, ids, weighted_grad[:, :-1] - student_p.gather(-1, ids) * total)


class _ChunkedSpanLoss(torch.autograd.Function):
    """Weighted span loss over rows of hidden states; logits exist one chunk at a time, recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, divergence_weight, ce_weight, targets, settings: _ChunkSettings):
        divergences, cross_entropies = [], []
        with torch.no_grad():
            for start in range(0, hidden.shape[0], settings.chunk_size):
                rows = slice(start, start + settings.chunk_size)
                divergence, cross_entropy, _ = _chunk_terms(
                    hidden, targets, divergence_weight, ce_weight, settings, rows, want_grad=False
                )
                divergences.append(divergence)
                cross_entropies.append(cross_entropy)
        divergence = torch.cat(divergences) if divergences else hidden.new_zeros(0, dtype=torch.float32)
        cross_entropy = torch.cat(cross_entropies) if cross_entropies else divergence
        loss = (divergence_weight * divergence).sum() + (ce_weight * cross_entropy).sum()
        ctx.save_for_backward(hidden, weight, bias, divergence_weight, ce_weight, targets)
        ctx.settings = settings
        ctx.mark_non_differentiable(divergence, cross_entropy)
        return loss, divergence, cross_entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_divergence, _grad_cross_entropy):
        hidden, weight, bias, divergence_weight, ce_weight, targets = ctx.saved_tensors
        settings = ctx.settings
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias and bias.numel() else None
        with torch.no_grad():
            for start in range(0, hidden.shape[0], settings.chunk_size):
                rows = slice(start, start + settings.chunk_size)
                _, _, grad_raw = _chunk_terms(
                    hidden, targets, divergence_weight, ce_weight, settings, rows, want_grad=True
                )
                if grad_raw is None:
                    continue
                grad_raw = grad_raw * grad_loss
                if grad_hidden is not None:
                    grad_hidden[rows] = (grad_raw.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += grad_raw.t() @ hidden[rows].float()
                if grad_bias is not None:
                    grad_bias += grad_raw.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
