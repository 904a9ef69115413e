"""bitsandbytes 4-bit layers on CPU: one layout for training on every processor, and a clear error for unpackable ones.

On processors with AVX-512 BF16, bitsandbytes (0.49 and later) repacks a `Linear4bit` weight *in place* the first
time the layer runs in eval mode without gradients (a `generate`, an evaluation, a teacher forward), into a layout
that only its bf16 inference kernel reads. That kernel has no backward: a QLoRA student that generated (agent
rollouts, GKD's on-policy samples) or was evaluated and then trains again computes its frozen base layers in bf16
and passes no gradient through them, so its LoRA gradients are silently wrong or missing. Other processors never
repack. The trainer therefore keeps every 4-bit layer it holds in the layout bitsandbytes trains with
(`keep_4bit_training_layout`), which also makes a 4-bit teacher compute the same logits on every CPU (live or
cached). Inference-only models (`generate`, `eval`) keep bitsandbytes' fast path; its repacking cannot handle every
shape, so such models are checked first (`check_4bit_layers_packable`).
"""

from __future__ import annotations

from torch import nn

# bitsandbytes' CPU repacking works on blocks of 32 output rows; the input size must hold whole quantization blocks.
_PACK_BLOCK_ROWS = 32


def linear_4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The bitsandbytes `Linear4bit` layers of `model` (none when bitsandbytes is not installed)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Linear4bit)]


def keep_4bit_training_layout(model: nn.Module, role: str = "model") -> int:
    """Stop bitsandbytes from repacking `model`'s 4-bit CPU weights for inference; returns the layers covered.

    Raises `ValueError` when a layer was already repacked (the model ran in eval mode without gradients on an
    AVX-512 BF16 CPU before it reached the trainer): the repacking rounds the scales to bf16, so it cannot be undone
    exactly, and the model must be loaded again.
    """
    layers = linear_4bit_layers(model)
    repacked = [name for name, layer in layers if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)]
    if repacked:
        raise ValueError(
            f"The {role}'s 4-bit layers {_names(repacked)} were already repacked by bitsandbytes for CPU inference "
            "(the model ran in eval mode without gradients on a CPU with AVX-512 BF16), a layout it cannot train "
            "through and cannot undo exactly. Load the model again and hand it to the trainer before running it."
        )
    for _, layer in layers:
        layer.support_avx512bf16_for_cpu = False  # the flag bitsandbytes reads before repacking
    return len(layers)


def check_4bit_layers_packable(model: nn.Module, name_or_path: str) -> None:
    """Refuse a 4-bit model on CPU whose layers bitsandbytes' inference repacking cannot handle.

    Checked on every CPU, not only on those that repack, so a model fails the same way wherever it runs.
    """
    unpackable = []
    for name, layer in linear_4bit_layers(model):
        if layer.weight.device.type != "cpu":
            continue
        block = layer.weight.quant_state.blocksize
        if layer.in_features % block or layer.out_features % _PACK_BLOCK_ROWS:
            unpackable.append(f"{name} ({layer.in_features} -> {layer.out_features})")
    if unpackable:
        raise ValueError(
            f"{name_or_path}: bitsandbytes cannot run these layers in 4-bit on CPU: {_names(unpackable)}. On CPU a "
            f"4-bit layer needs in_features a multiple of the quantization block size ({block}) and out_features a "
            f"multiple of {_PACK_BLOCK_ROWS}, as every real model has. Load this model without 4-bit quantization, "
            "or run it on a GPU."
        )


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
