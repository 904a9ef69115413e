"""Tests run offline on CPU: no hub, tiny models built from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Text in every segmentation style, so the tiny tokenizer has merges for all of them.
EXTRA_TEXTS = [
    "Question: Which town is larger, Varnholt or Ostmere?\nThought 1: I should search Varnholt.\n"
    "Action 1: Search[Varnholt]\nObservation 1: Varnholt has 4120 inhabitants.\nAction 2: Finish[Varnholt]",
    "> think: I need to find the apple.\nOK.\n> go to countertop 1\nOn the countertop 1, you see an apple 1.",
    "Action: think[the red mug is cheaper]\nAction: search[red mug]\nAction: click[Buy Now]",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from trl_agent_distill.tiny import toy_texts, train_tokenizer

    return train_tokenizer(toy_texts() + EXTRA_TEXTS, vocab_size=600)


@pytest.fixture
def make_model(tiny_tokenizer):
    """Fresh tiny causal LMs: the student is smaller than the teacher, both share the tokenizer."""
    from trl_agent_distill.tiny import build_tiny_model

    def make(role: str = "student", **overrides):
        sizes = {"student": dict(hidden_size=64, num_layers=2, seed=0), "teacher": dict(hidden_size=64, num_layers=3, seed=1)}
        return build_tiny_model(tiny_tokenizer, **{**sizes[role], **overrides})

    return make


@pytest.fixture(scope="session")
def toy_dataset():
    from trl_agent_distill.tiny import toy_trajectories

    return toy_trajectories()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer, make_model):
    """A directory holding a one-layer tiny chat model and its tokenizer, loadable by name like a hub model.

    The default width (32) is below what bitsandbytes' 4-bit CPU kernels accept: 4-bit tests ask for 64.
    """

    def save(name: str = "model", hidden_size: int = 32):
        directory = tmp_path / name
        make_model("student", hidden_size=hidden_size, num_layers=1).save_pretrained(directory)
        tiny_tokenizer.save_pretrained(directory)
        return directory

    return save


@pytest.fixture
def nf4_config():
    """bitsandbytes' 4-bit NF4 settings for CPU tests (float32 compute)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(params=[True, False], ids=["avx512bf16-cpu", "other-cpu"])
def bnb_cpu_repacking(request, monkeypatch):
    """Run a 4-bit test as on a CPU where bitsandbytes repacks 4-bit weights for inference (AVX-512 BF16) and as on
    one where it does not, whatever this machine is: its layers read this flag when they are built."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.fixture
def generate_calls(monkeypatch):
    """`watch(model)` returns a list that records the batch size of each `model.generate` call from then on."""

    def watch(model):
        calls, original = [], model.generate

        def counting(*args, **kwargs):
            calls.append(kwargs["input_ids"].shape[0])
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", counting)
        return calls

    return watch


@pytest.fixture(scope="session")
def tiny_demo_settings():
    """`DemoConfig` overrides that run the whole toy-world pipeline in about a minute (tiny world and models)."""
    return dict(
        num_towns=40, train_tasks=48, test_tasks=4, vocab_size=768, teacher_hidden_size=96, teacher_layers=2,
        teacher_steps=200, teacher_cot_answers=12, student_hidden_size=32, student_layers=1, generate_tasks=8, student_steps=3,
        per_device_train_batch_size=4, self_consistency=2, batch_size=8, max_new_tokens=200, show_progress=False,
    )
