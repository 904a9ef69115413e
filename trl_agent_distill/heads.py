"""Output heads of causal LMs, described well enough to compute logits chunk by chunk outside the model.

The chunked loss never lets a model build its (batch, tokens, vocab) logits: it captures the final hidden states
(the output of the model's last norm, through a forward hook) and applies the `lm_head` itself, a few hundred
positions at a time. That needs each family's logit transform: Cohere multiplies by `logit_scale`, Granite divides
by `logits_scaling`, Gemma 2/3 soft-cap with `final_logit_softcapping`. A model whose head this module does not know
returns `None`, and the trainer falls back to the logits path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

# model_type -> how its logits follow from `lm_head(hidden)`. Families not listed are not assumed to be plain.
_PLAIN = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "olmo2", "smollm3", "qwen2_moe", "qwen3_moe")
_SOFTCAPPED = ("gemma2", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class LogitHead:
    """`logits = softcap * tanh(scale * (hidden @ weight.T + bias) / softcap)` (each part optional)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def raw(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden @ weight.T + bias` in the weight's dtype (the matmul the model would do)."""
        return nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """The family's logit transform, in float32."""
        logits = raw.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.raw(hidden))

    def transform_backward(self, grad_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Gradient with respect to the raw matmul output, given the gradient and value of the final logits."""
        if self.softcap is not None:
            grad_logits = grad_logits * (1.0 - (logits / self.softcap) ** 2)
        if self.scale != 1.0:
            grad_logits = grad_logits * self.scale
        return grad_logits


def logit_head(model: nn.Module) -> LogitHead | None:
    """The `LogitHead` of a (possibly PEFT- or DDP-wrapped) causal LM, or None if its family is not known."""
    model = _unwrap(model)
    config = model.config.get_text_config()
    model_type = config.model_type
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:  # a LoRA-wrapped or quantized lm_head has no plain weight to multiply by
        return None
    if model_type in _PLAIN:
        return LogitHead(head.weight, head.bias)
    if model_type in _SOFTCAPPED:
        return LogitHead(head.weight, head.bias, softcap=getattr(config, "final_logit_softcapping", None))
    if model_type == "cohere":
        return LogitHead(head.weight, head.bias, scale=float(config.logit_scale))
    if model_type == "granite":
        return LogitHead(head.weight, head.bias, scale=1.0 / float(config.logits_scaling))
    return None


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm whose output feeds `lm_head` (`model.model.norm` in every family `logit_head` knows)."""
    decoder = getattr(_unwrap(model), "model", None)
    norm = getattr(decoder, "norm", None)
    return norm if isinstance(norm, nn.Module) else None


class FinalHiddenStates:
    """Forward hook that keeps the last output of a model's final norm (the hidden states `lm_head` sees).

    Running the model with `logits_to_keep=1` then costs one position of logits, not the whole sequence.
    """

    def __init__(self, model: nn.Module):
        norm = final_norm(model)
        if norm is None:
            raise ValueError(f"{type(_unwrap(model)).__name__} has no `model.norm` to capture hidden states from.")
        self.value: torch.Tensor | None = None
        self._handle = norm.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs, output) -> None:
        self.value = output

    def pop(self) -> torch.Tensor:
        """The captured states, released so they do not outlive the step."""
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("The model's final norm did not run; no hidden states were captured.")
        return value

    def remove(self) -> None:
        self._handle.remove()


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP / DeepSpeed (`.module`) and PEFT (`get_base_model`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
