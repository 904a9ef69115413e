"""4-bit models on CPU: one training layout on every processor, and layers bitsandbytes cannot run refused by name.

(Training after a rollout equals training without it: tests/test_rollout.py.) bitsandbytes repacks 4-bit weights for inference on CPUs with AVX-512 BF16 only; the `bnb_cpu_repacking` fixture
runs each test as on such a CPU and as on another one, so both paths are covered wherever the suite runs.
"""

import pytest
import torch

from trl_agent_distill.quantization import check_4bit_layers_packable, keep_4bit_training_layout, linear_4bit_layers

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def load_4bit(nf4_config):
    from transformers import AutoModelForCausalLM

    return lambda directory: AutoModelForCausalLM.from_pretrained(directory, quantization_config=nf4_config)


def test_a_model_bitsandbytes_already_repacked_is_refused(load_4bit, tiny_model_dir):
    model = load_4bit(tiny_model_dir("student", hidden_size=64))
    name, layer = linear_4bit_layers(model)[0]
    layer.weight.quant_state.packing_format_for_cpu = True  # what an eval-mode forward leaves on an AVX-512 BF16 CPU
    with pytest.raises(ValueError, match=f"student's 4-bit layers {name} were already repacked.*Load the model again"):
        keep_4bit_training_layout(model, "student")


def test_layers_bitsandbytes_cannot_run_in_4bit_on_cpu_are_refused_by_name(load_4bit, tiny_model_dir):
    narrow = tiny_model_dir("narrow", hidden_size=32)
    with pytest.raises(ValueError, match=r"narrow: bitsandbytes cannot run these layers.*q_proj \(32 -> 32\).*"
                                         r"multiple of the quantization block size \(64\)"):
        check_4bit_layers_packable(load_4bit(narrow), str(narrow))
    check_4bit_layers_packable(load_4bit(tiny_model_dir("wide", hidden_size=64)), "wide")
    keep_4bit_training_layout(load_4bit(narrow))  # training never repacks, so any width trains


def test_a_4bit_model_loaded_for_generation_is_checked_and_generates(
    bnb_cpu_repacking, tiny_model_dir, tiny_tokenizer
):
    from trl_agent_distill.tasks import AgentTaskConfig, load_backend

    config = AgentTaskConfig(dataset_name="unused", load_in_4bit=True, dtype="float32")
    with pytest.raises(ValueError, match="cannot run these layers in 4-bit on CPU"):
        load_backend(str(tiny_model_dir("narrow", hidden_size=32)), config)
    if bnb_cpu_repacking and not _cpu_has_avx512bf16():
        pytest.skip("bitsandbytes' repacked inference kernel needs a CPU with AVX-512 BF16; training never uses it")
    backend = load_backend(str(tiny_model_dir("wide", hidden_size=64)), config)
    ids = tiny_tokenizer("Thought: search", return_tensors="pt").input_ids
    with torch.no_grad():
        out = backend.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def _cpu_has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())
