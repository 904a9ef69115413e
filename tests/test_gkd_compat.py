"""`AgentDistillTrainer` as a drop-in for TRL's `GKDTrainer`.

1. TRL's own GKD tests (`tests/experimental/test_gkd_trainer.py` of TRL, Apache-2.0), ported: tiny local models and
   a small local chat dataset instead of hub ones, `GKDTrainer` / `GKDConfig` swapped for `AgentDistillTrainer` /
   `AgentDistillConfig`, assertions unchanged. Not ported: the Liger-kernel tests (TRL 1.16 removed the Liger path
   from GKD). The two loss-normalization tests are GPU-gated upstream only because GKD's loss path is
   accelerator-affine; here they run on CPU.
2. GKD's keys and hooks: a collator yielding GKD's keys only, `trainer.beta`, an overridden `generalized_jsd_loss`,
   on-policy sampling from the collator's prompts; each checked against `GKDTrainer` on the same batch.
3. TRL's `examples/scripts/gkd.py`, its logic with only the class names changed (local models and data).
4. The README's table of `AgentDistillConfig` defaults that differ from `GKDConfig`'s.
"""

import copy
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from transformers import AutoModelForCausalLM, GenerationConfig
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.experimental.utils import DataCollatorForChatML

from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer

README = Path(__file__).parent.parent / "README.md"

# Plain chat rows with no agent markers, like TRL's test data: `segmentation_style: auto` falls back to token-level
# distillation on them (one ACT span per assistant turn).
CHAT = [
    ("Name a colour.", "Red."),
    ("Name a colour.", "Green, like fresh grass in spring."),
    ("What is two plus three?", "Five."),
    ("Which is heavier, a kilo of iron or a kilo of feathers?", "They weigh the same: one kilo each."),
    ("Say hello in French.", "Bonjour!"),
    ("What do bees make?", "Honey, from the nectar of flowers."),
    ("How many legs does a spider have?", "Eight."),
    ("What is the opposite of cold?", "Hot."),
    ("Spell the word cat backwards.", "t-a-c"),
    ("What falls from clouds when it rains?", "Water, in drops."),
]


def chat_rows(pairs=CHAT) -> Dataset:
    return Dataset.from_dict(
        {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]}
    )


@pytest.fixture
def tokenizer(tiny_tokenizer):
    """As TRL's tests set it up: the pad token is the eos token."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture
def model_id(tiny_model_dir):
    return str(tiny_model_dir("tiny-model"))


@pytest.fixture
def zen():
    """Stands in for `trl-internal-testing/zen`, `conversational_language_modeling`."""
    return DatasetDict({"train": chat_rows(CHAT[:8]), "test": chat_rows(CHAT[8:])})


def cpu_args(tmp_path, config_class=AgentDistillConfig, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, disable_tqdm=True)
    return config_class(**{**defaults, **overrides})


# ============================================================================= 1. TRL's GKD tests, ported
class TestGKDTrainerGenerateOnPolicy:
    @pytest.fixture(autouse=True)
    def setup(self, make_model, tokenizer):
        self.device = "cpu"
        self.tokenizer = tokenizer
        self.model = make_model("student")
        self.generation_config = GenerationConfig(
            max_new_tokens=20,
            num_return_sequences=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )

    def test_generate_on_policy_outputs_deterministic(self):
        prompts = ["Hello, how are you?", "What's the weather like today?"]
        tokenized_prompts = self.tokenizer(prompts, return_tensors="pt", padding=True)
        inputs = {
            "prompts": tokenized_prompts["input_ids"].to(self.device),
            "prompt_attention_mask": tokenized_prompts["attention_mask"].to(self.device),
        }
        deterministic_generation_config = GenerationConfig(
            max_new_tokens=30,
            num_return_sequences=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            do_sample=False,
            temperature=0.0,
        )
        outputs = AgentDistillTrainer.generate_on_policy_outputs(self.model, inputs, deterministic_generation_config)
        new_input_ids, new_attention_mask, new_labels = outputs
        generated_texts = self.tokenizer.batch_decode(new_input_ids, skip_special_tokens=True)
        for prompt, generated_text in zip(prompts, generated_texts, strict=True):
            assert generated_text.startswith(prompt), (
                f"Generated text '{generated_text}' does not start with prompt '{prompt}'"
            )
        outputs2 = AgentDistillTrainer.generate_on_policy_outputs(self.model, inputs, deterministic_generation_config)
        new_input_ids2, new_attention_mask2, new_labels2 = outputs2
        assert torch.all(new_input_ids.eq(new_input_ids2)), "Deterministic generations are not identical"
        assert torch.all(new_attention_mask.eq(new_attention_mask2)), (
            "Attention masks for deterministic generations are not identical"
        )
        assert torch.all(new_labels.eq(new_labels2)), "Labels for deterministic generations are not identical"

    def test_generate_on_policy_outputs(self):
        prompts = ["Hello, how are you?", "What's the weather like today?"]
        tokenized_prompts = self.tokenizer(prompts, return_tensors="pt", padding=True)
        inputs = {
            "prompts": tokenized_prompts["input_ids"].to(self.device),
            "prompt_attention_mask": tokenized_prompts["attention_mask"].to(self.device),
        }
        outputs = AgentDistillTrainer.generate_on_policy_outputs(self.model, inputs, self.generation_config)
        assert isinstance(outputs, tuple)
        assert len(outputs) == 3
        new_input_ids, new_attention_mask, new_labels = outputs
        batch_size = len(prompts)
        assert new_input_ids.shape[0] == batch_size
        assert new_attention_mask.shape[0] == batch_size
        assert new_labels.shape[0] == batch_size
        assert isinstance(new_input_ids, torch.Tensor)
        assert isinstance(new_attention_mask, torch.Tensor)
        assert isinstance(new_labels, torch.Tensor)
        assert new_input_ids.shape == new_attention_mask.shape
        assert new_labels.shape == new_attention_mask.shape

    def test_generate_on_policy_outputs_masks_prompt(self):
        prompts = ["Hello, how are you doing today?", "Hi"]
        self.tokenizer.padding_side = "left"
        tokenized_prompts = self.tokenizer(prompts, return_tensors="pt", padding=True)
        prompt_width = tokenized_prompts["input_ids"].shape[1]
        inputs = {
            "prompts": tokenized_prompts["input_ids"].to(self.device),
            "prompt_attention_mask": tokenized_prompts["attention_mask"].to(self.device),
        }
        generation_config = GenerationConfig(
            max_new_tokens=16,
            min_new_tokens=8,
            num_return_sequences=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            do_sample=False,
        )
        _, _, new_labels = AgentDistillTrainer.generate_on_policy_outputs(self.model, inputs, generation_config)
        assert (new_labels[:, :prompt_width] == -100).all(), "Prompt positions are not fully masked"
        assert (new_labels[:, prompt_width:] != -100).any(), "Completion tokens were unexpectedly all masked"

    def test_generate_on_policy_outputs_pad_equals_eos_keeps_eos(self):
        eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id
        assert pad_id == eos_id
        prompts = torch.tensor([[pad_id, 11, eos_id, 13], [pad_id, 11, eos_id, 13]], device=self.device)
        prompt_mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]], device=self.device)
        completions = torch.tensor([[21, 22, eos_id, pad_id, pad_id], [21, 22, 23, 24, 25]], device=self.device)
        generated_sequence = torch.cat([prompts, completions], dim=1)

        class DummyModel:
            def generate(self, input_ids, attention_mask, generation_config, return_dict_in_generate):
                return SimpleNamespace(sequences=generated_sequence)

        inputs = {"prompts": prompts, "prompt_attention_mask": prompt_mask}
        _, new_attention_mask, new_labels = AgentDistillTrainer.generate_on_policy_outputs(
            DummyModel(), inputs, self.generation_config
        )
        prompt_width = prompts.shape[1]
        eos_pos = prompt_width + 2
        assert torch.equal(new_attention_mask[:, :prompt_width], prompt_mask)
        assert new_attention_mask[0, eos_pos] == 1
        assert new_labels[0, eos_pos] == eos_id
        assert torch.all(new_attention_mask[0, eos_pos + 1 :] == 0)
        assert torch.all(new_labels[0, eos_pos + 1 :] == -100)
        assert torch.all(new_attention_mask[1, prompt_width:] == 1)
        assert torch.equal(new_labels[1, prompt_width:], completions[1])
        assert torch.all(new_labels[:, :prompt_width] == -100)

    def test_generate_on_policy_outputs_without_eos_id_keeps_full_completion(self):
        prompts = torch.tensor([[11, 12, 13], [14, 15, 16]], device=self.device)
        prompt_mask = torch.ones_like(prompts)
        completions = torch.tensor([[21, 22, 23, 24], [25, 26, 27, 28]], device=self.device)
        generated_sequence = torch.cat([prompts, completions], dim=1)

        class DummyModel:
            def generate(self, input_ids, attention_mask, generation_config, return_dict_in_generate):
                return SimpleNamespace(sequences=generated_sequence)

        generation_config = SimpleNamespace(eos_token_id=None)
        inputs = {"prompts": prompts, "prompt_attention_mask": prompt_mask}
        _, new_attention_mask, new_labels = AgentDistillTrainer.generate_on_policy_outputs(
            DummyModel(), inputs, generation_config
        )
        prompt_width = prompts.shape[1]
        assert torch.all(new_attention_mask[:, prompt_width:] == 1)
        assert torch.all(new_labels[:, prompt_width:] != -100)

    def test_generate_on_policy_outputs_masks_after_any_stop_token(self):
        prompts = torch.tensor([[11, 12, 13], [14, 15, 16]], device=self.device)
        prompt_mask = torch.ones_like(prompts)
        completions = torch.tensor([[21, 7, 23, 24], [25, 26, 9, 28]], device=self.device)
        generated_sequence = torch.cat([prompts, completions], dim=1)

        class DummyModel:
            def generate(self, input_ids, attention_mask, generation_config, return_dict_in_generate):
                return SimpleNamespace(sequences=generated_sequence)

        generation_config = SimpleNamespace(eos_token_id=[7, 9])
        inputs = {"prompts": prompts, "prompt_attention_mask": prompt_mask}
        _, new_attention_mask, new_labels = AgentDistillTrainer.generate_on_policy_outputs(
            DummyModel(), inputs, generation_config
        )
        prompt_width = prompts.shape[1]
        completion_mask = new_attention_mask[:, prompt_width:]
        assert torch.equal(completion_mask[0], torch.tensor([1, 1, 0, 0], device=self.device))
        assert torch.equal(completion_mask[1], torch.tensor([1, 1, 1, 0], device=self.device))
        assert new_labels[0, prompt_width + 1] == 7
        assert new_labels[1, prompt_width + 2] == 9
        assert torch.all(new_labels[0, prompt_width + 2 :] == -100)
        assert torch.all(new_labels[1, prompt_width + 3 :] == -100)


class TestGeneralizedJSDLoss:
    def setup_method(self):
        self.batch_size = 2
        self.seq_length = 3
        self.vocab_size = 5
        self.student_logits = torch.randn(self.batch_size, self.seq_length, self.vocab_size)
        self.teacher_logits = torch.randn(self.batch_size, self.seq_length, self.vocab_size)

    def test_uniform_distribution(self):
        logits = torch.ones(1, 1, self.vocab_size)
        loss = AgentDistillTrainer.generalized_jsd_loss(logits, logits)
        assert round(abs(loss.item() - 0), 5) == 0

    def test_generalized_jsd_loss_edge_cases(self):
        student_logits = torch.log(torch.tensor([[0.1, 0.9]])).unsqueeze(0)
        teacher_logits = torch.log(torch.tensor([[0.9, 0.1]])).unsqueeze(0)
        loss_beta_1 = AgentDistillTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=1)
        expected_loss_beta_1 = F.kl_div(
            F.log_softmax(teacher_logits, dim=-1), F.softmax(student_logits, dim=-1), reduction="batchmean"
        )
        assert round(abs(loss_beta_1.item() - expected_loss_beta_1.item()), 5) == 0
        loss_beta_0 = AgentDistillTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=0)
        expected_loss_beta_0 = F.kl_div(
            F.log_softmax(student_logits, dim=-1), F.softmax(teacher_logits, dim=-1), reduction="batchmean"
        )
        assert round(abs(loss_beta_0.item() - expected_loss_beta_0.item()), 5) == 0

    def test_output_shape(self):
        loss = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits)
        assert torch.is_tensor(loss)
        assert loss.shape == torch.Size([])

    def test_beta_values(self):
        loss_beta_0 = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, beta=0)
        loss_beta_1 = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, beta=1)
        assert loss_beta_0 != loss_beta_1

    def test_temperature_scaling(self):
        loss_temp_1 = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, temperature=1)
        loss_temp_2 = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, temperature=2)
        assert loss_temp_1 != loss_temp_2

    def test_reduction_methods(self):
        loss_batchmean = AgentDistillTrainer.generalized_jsd_loss(
            self.student_logits, self.teacher_logits, reduction="batchmean"
        )
        loss_sum = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, reduction="sum")
        loss_mean = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, reduction="mean")
        loss_none = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, reduction="none")
        assert loss_batchmean.shape == torch.Size([])
        assert loss_sum.shape == torch.Size([])
        assert loss_mean.shape == torch.Size([])
        assert loss_none.shape == self.student_logits.shape

    def test_symmetry(self):
        student_teacher = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, beta=0.1)
        teacher_student = AgentDistillTrainer.generalized_jsd_loss(self.teacher_logits, self.student_logits, beta=0.1)
        assert student_teacher != teacher_student
        student_teacher = AgentDistillTrainer.generalized_jsd_loss(self.student_logits, self.teacher_logits, beta=0.5)
        teacher_student = AgentDistillTrainer.generalized_jsd_loss(self.teacher_logits, self.student_logits, beta=0.5)
        assert student_teacher == teacher_student

    def test_zero_loss_for_identical_inputs(self):
        identical_logits = torch.randn(self.batch_size, self.seq_length, self.vocab_size)
        loss = AgentDistillTrainer.generalized_jsd_loss(identical_logits, identical_logits)
        assert round(abs(loss.item() - 0), 6) == 0


class TestGKDTrainer:
    @pytest.fixture(autouse=True)
    def setup(self, tmp_path, model_id, tokenizer, zen):
        self.tmp_dir = str(tmp_path)
        self.model_id = model_id
        self.model = AutoModelForCausalLM.from_pretrained(self.model_id, dtype="float32")
        self.teacher_model = AutoModelForCausalLM.from_pretrained(self.model_id)
        self.tokenizer = tokenizer
        self.zen = zen

    def test_gkd_trainer(self):
        training_args = AgentDistillConfig(
            output_dir=self.tmp_dir,
            dataloader_drop_last=True,
            eval_strategy="steps",
            max_steps=4,
            eval_steps=2,
            save_steps=2,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=2,
            report_to="none",
        )
        dataset = self.zen
        trainer = AgentDistillTrainer(
            model=self.model_id,
            teacher_model=self.model_id,
            args=training_args,
            train_dataset=dataset["train"],
            eval_dataset=dataset["test"],
            processing_class=self.tokenizer,
        )
        trainer.train()
        assert trainer.state.log_history[(-1)]["train_loss"] is not None
        assert trainer.state.log_history[0]["eval_loss"] is not None
        assert "model.safetensors" in os.listdir(self.tmp_dir + "/checkpoint-2")

    @pytest.mark.parametrize(
        "eval_dataset_type",
        [
            "dataset",
            "iterable_dataset",
            "dataset_dict",
            "iterable_dataset_dict",
            "dict_of_dataset",
            "dict_of_iterable_dataset",
            "none",
        ],
    )
    def test_init_with_eval_dataset(self, eval_dataset_type):
        train_dataset = self.zen["train"]
        if eval_dataset_type == "none":
            eval_dataset = None
        else:
            streaming = "iterable" in eval_dataset_type
            eval_split = self.zen["test"].to_iterable_dataset() if streaming else self.zen["test"]
            if eval_dataset_type in ("dataset", "iterable_dataset"):
                eval_dataset = eval_split
            elif eval_dataset_type in ("dataset_dict", "iterable_dataset_dict"):
                dataset_dict_cls = IterableDatasetDict if streaming else DatasetDict
                eval_dataset = dataset_dict_cls({"data1": eval_split, "data2": eval_split})
            else:
                eval_dataset = {"data1": eval_split, "data2": eval_split}
        training_args = AgentDistillConfig(output_dir=self.tmp_dir, report_to="none")
        trainer = AgentDistillTrainer(
            model=self.model_id,
            teacher_model=self.model_id,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=self.tokenizer,
        )
        if eval_dataset_type == "none":
            assert trainer.eval_dataset is None
        elif isinstance(trainer.eval_dataset, dict):
            assert set(trainer.eval_dataset.keys()) == {"data1", "data2"}
        else:
            # The one changed assertion: GKD keeps the eval dataset object as given (it never tokenizes ahead); this
            # trainer encodes it once with `dataset.map`, as TRL's SFTTrainer prepares its datasets.
            assert type(trainer.eval_dataset) is type(eval_dataset)
            assert "input_ids" in next(iter(trainer.eval_dataset))
            if not isinstance(eval_dataset, IterableDataset):
                assert len(trainer.eval_dataset) == len(eval_dataset)

    def test_generation_config_init(self):
        training_args = AgentDistillConfig(output_dir=self.tmp_dir)
        dataset = self.zen
        trainer = AgentDistillTrainer(
            model=self.model_id,
            teacher_model=self.model_id,
            args=training_args,
            train_dataset=dataset["train"],
            eval_dataset=dataset["test"],
            processing_class=self.tokenizer,
        )
        assert trainer.generation_config.pad_token_id == self.tokenizer.eos_token_id
        assert trainer.generation_config.eos_token_id == self.model.generation_config.eos_token_id
        assert trainer.generation_config.max_new_tokens == training_args.max_new_tokens
        assert trainer.generation_config.temperature == training_args.temperature
        assert trainer.generation_config.top_k == 0
        assert trainer.generation_config.top_p == 1.0

    def test_init_multimodal_model(self, tiny_tokenizer):
        """Multimodal configs keep vocab_size in their text_config; the vocab check must handle them."""
        model_id = save_tiny_gemma3(Path(self.tmp_dir) / "tiny-Gemma3ForConditionalGeneration", tiny_tokenizer)
        tokenizer = tiny_tokenizer
        training_args = AgentDistillConfig(output_dir=self.tmp_dir, report_to="none")
        dataset = self.zen
        trainer = AgentDistillTrainer(
            model=model_id,
            teacher_model=model_id,
            args=training_args,
            train_dataset=dataset["train"],
            processing_class=tokenizer,
        )
        student_vocab_size = trainer.model.config.get_text_config().vocab_size
        assert student_vocab_size == trainer.teacher_model.config.get_text_config().vocab_size

    def test_loss_normalizes_by_num_items_in_batch(self):
        common = dict(output_dir=self.tmp_dir, report_to="none", per_device_train_batch_size=2, max_length=64)
        dataset = self.zen["train"].select(range(2))
        trainer = AgentDistillTrainer(
            model=self.model_id,
            teacher_model=self.model_id,
            args=AgentDistillConfig(use_liger_kernel=False, **common),
            train_dataset=dataset,
            processing_class=self.tokenizer,
        )
        torch.manual_seed(0)
        with torch.no_grad():
            for p in trainer.teacher_model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        device = next(trainer.model.parameters()).device
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        prompt_lengths = batch["prompts"].shape[1]
        num_valid = (batch["labels"][:, prompt_lengths:] != -100).sum()
        trainer.model.eval()
        with torch.no_grad():
            loss_mean = trainer.compute_loss(trainer.model, batch)
            loss_global = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid)
        torch.testing.assert_close(loss_global, loss_mean, rtol=1e-4, atol=1e-6)
        loss_double = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid * 2)
        torch.testing.assert_close(loss_double, loss_mean / 2, rtol=1e-4, atol=1e-6)

    def test_loss_covers_all_completion_tokens_with_variable_length_prompts(self):
        common = dict(output_dir=self.tmp_dir, report_to="none", per_device_train_batch_size=2, max_length=64)
        dataset = Dataset.from_dict(
            {
                "messages": [
                    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you?"}],
                    [
                        {"role": "user", "content": "Please explain in detail the theory of general relativity"},
                        {"role": "assistant", "content": "OK"},
                    ],
                ]
            }
        )
        trainer = AgentDistillTrainer(
            model=self.model_id,
            teacher_model=self.model_id,
            args=AgentDistillConfig(use_liger_kernel=False, **common),
            train_dataset=dataset,
            processing_class=self.tokenizer,
        )
        torch.manual_seed(0)
        with torch.no_grad():
            for p in trainer.teacher_model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        device = next(trainer.model.parameters()).device
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert batch["prompts"].shape[1] > (batch["labels"][0] != -100).nonzero()[0].item()
        num_valid = (batch["labels"] != -100).sum()
        trainer.model.eval()
        with torch.no_grad():
            loss_mean = trainer.compute_loss(trainer.model, batch)
            loss_global = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_valid)
        torch.testing.assert_close(loss_global, loss_mean, rtol=1e-4, atol=1e-6)


def save_tiny_gemma3(directory: Path, tokenizer) -> str:
    """A one-layer Gemma-3 image-text model over the tiny tokenizer, saved like a hub checkpoint."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=len(tokenizer) - 1, boi_token_index=len(tokenizer) - 2,
                          eoi_token_index=len(tokenizer) - 3)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


# ============================================================================= 2. GKD's keys and hooks
def trainer_pair(
    tmp_path, make_model, tokenizer, gkd_class=GKDTrainer, ours_class=AgentDistillTrainer, ours=None, **config
):
    """A `GKDTrainer` and an `AgentDistillTrainer` with equal student and teacher weights and GKD's collator;
    `config` goes to both configs, `ours` to `AgentDistillConfig` only."""
    common = {"per_device_train_batch_size": 2, "max_length": 256, "lmbda": 0.0, **config}
    trainers = []
    for trainer_class, config_class, own in ((gkd_class, GKDConfig, {}), (ours_class, AgentDistillConfig, ours)):
        args = cpu_args(tmp_path / trainer_class.__name__, config_class, **common, **(own or {}))
        trainers.append(
            trainer_class(
                model=make_model("student"), teacher_model=make_model("teacher"), args=args,
                data_collator=DataCollatorForChatML(tokenizer=tokenizer, max_length=256),
                train_dataset=chat_rows(), processing_class=tokenizer,
            )
        )
    return trainers


def gkd_batch(tokenizer, rows, max_length=256):
    return DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)(list(rows))


@pytest.mark.parametrize("implementation", ["chunked", "logits"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_gkd_collator_trains_labels_as_one_span_with_gkds_loss(tmp_path, make_model, tokenizer, beta, implementation):
    gkd, ours = trainer_pair(tmp_path, make_model, tokenizer, beta=beta, ours=dict(loss_implementation=implementation))
    assert (ours._chunked is not None) == (implementation == "chunked")
    batch = gkd_batch(tokenizer, chat_rows().select(range(4)))
    assert "reason_mask" not in batch and "act_mask" not in batch
    trained = int((batch["labels"][:, 1:] != -100).sum())
    for num_items_in_batch in (None, 3 * trained):
        with torch.no_grad():
            expected = gkd.compute_loss(gkd.model, dict(batch), num_items_in_batch=num_items_in_batch)
            loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=num_items_in_batch)
        torch.testing.assert_close(loss, expected)
    # Under gradient accumulation, 'span' normalization counts the labelled tokens as the one (ACT) kind.
    ours._get_num_items_in_batch([batch, batch], torch.device("cpu"))
    assert [int(count) for count in ours._span_token_counts] == [0, 2 * trained]


def test_beta_set_after_construction_is_honoured(tmp_path, make_model, tokenizer):
    gkd, ours = trainer_pair(tmp_path, make_model, tokenizer, beta=0.5)
    batch = gkd_batch(tokenizer, chat_rows().select(range(4)))
    losses = []
    for beta in (0.0, 1.0, 0.5):
        ours.beta = gkd.beta = beta  # GKD's hook is the attribute; `args.beta` only sets it at construction
        with torch.no_grad():
            losses.append(ours.compute_loss(ours.model, dict(batch)))
            torch.testing.assert_close(losses[-1], gkd.compute_loss(gkd.model, dict(batch)))
    assert ours.args.beta == 0.5 and len({round(loss.item(), 6) for loss in losses}) == 3


def squared_log_ratio(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
                      num_items_in_batch=None):
    """A user's divergence: (1 + beta) * squared distance of log-probabilities, GKD's reduction."""
    mask = labels != -100
    per_token = ((F.log_softmax(student_logits, -1) - F.log_softmax(teacher_logits, -1)) ** 2).sum(-1)[mask]
    normalizer = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp_min(1)
    return (1 + beta) * per_token.sum() / normalizer


class SquaredGKDTrainer(GKDTrainer):
    generalized_jsd_loss = staticmethod(squared_log_ratio)


class SquaredAgentDistillTrainer(AgentDistillTrainer):
    generalized_jsd_loss = staticmethod(squared_log_ratio)


def test_an_overridden_generalized_jsd_loss_is_honoured(tmp_path, make_model, tokenizer, toy_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_agent_distill.trainer"):
        gkd, ours = trainer_pair(
            tmp_path, make_model, tokenizer, SquaredGKDTrainer, SquaredAgentDistillTrainer, beta=0.5
        )
    assert ours._chunked is None  # the user's divergence takes logits
    batch = gkd_batch(tokenizer, chat_rows().select(range(4)))
    with torch.no_grad():
        expected = gkd.compute_loss(gkd.model, dict(batch))
        torch.testing.assert_close(ours.compute_loss(ours.model, dict(batch)), expected)
        torch.testing.assert_close(ours.compute_loss(ours.model, dict(batch), num_items_in_batch=10), gkd.compute_loss(
            gkd.model, dict(batch), num_items_in_batch=10))
    assert caplog.text.count("overrides generalized_jsd_loss") == 1

    # With REASON / ACT masks it is the divergence of each kind: lambda_reason * D(REASON) + lambda_act * D(ACT).
    trainer = SquaredAgentDistillTrainer(
        model=make_model("student"), teacher_model=make_model("teacher"),
        args=cpu_args(tmp_path / "spans", lambda_act=2.0, beta=0.5, max_length=1024), train_dataset=toy_dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([toy_dataset[0], toy_dataset[1]])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student, teacher = (m(**inputs).logits[:, :-1] for m in (trainer.model, trainer.teacher_model))
    per_token = 1.5 * ((F.log_softmax(student, -1) - F.log_softmax(teacher, -1)) ** 2).sum(-1)
    reason, act = batch["reason_mask"][:, 1:].bool(), batch["act_mask"][:, 1:].bool()
    assert reason.any() and act.any()
    expected = (per_token[reason].sum() + 2.0 * per_token[act].sum()) / (reason.sum() + act.sum())
    torch.testing.assert_close(loss, expected)


def test_on_policy_samples_from_the_collators_prompts_as_gkd_does(tmp_path, make_model, tokenizer):
    """lmbda = 1 with dataset rows: both trainers sample the last assistant turn from the history before it (GKD's
    collator's prompt) and train exactly the sampled tokens."""
    gkd, ours = trainer_pair(tmp_path, make_model, tokenizer, beta=0.5, lmbda=1.0, max_new_tokens=12)
    turns = [[{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 2, pair + pair[::-1])]
             for pair in (CHAT[0], CHAT[3])]
    rows = [{"messages": messages} for messages in turns]  # two user and two assistant turns each
    batch = gkd_batch(tokenizer, rows)
    history = tokenizer.apply_chat_template(rows[0]["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(batch["prompts"][0][batch["prompt_attention_mask"][0].bool()]) == history
    seen, losses = {}, {}
    for name, trainer in (("gkd", gkd), ("ours", ours)):
        original = trainer.compute_loss
        trainer.compute_loss = lambda model, inputs, *a, _name=name, _original=original, **k: (
            seen.__setitem__(_name, dict(inputs)) or _original(model, inputs, *a, **k)
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test skips
        torch.manual_seed(0)
        losses[name] = trainer.training_step(trainer.model, dict(batch))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(seen["ours"][key], seen["gkd"][key])
    width = batch["prompts"].shape[1]
    assert torch.equal(seen["ours"]["input_ids"][:, :width], batch["prompts"])
    assert (seen["ours"]["labels"][:, :width] == -100).all() and (seen["ours"]["labels"][:, width:] != -100).any()
    torch.testing.assert_close(losses["ours"], losses["gkd"])


def test_generation_without_prompts_names_the_missing_keys(tmp_path, make_model, tokenizer):
    _, ours = trainer_pair(tmp_path, make_model, tokenizer, lmbda=1.0)
    batch = gkd_batch(tokenizer, chat_rows().select(range(2)))
    del batch["prompts"], batch["prompt_attention_mask"]
    with pytest.raises(ValueError, match=r"no \['prompts', 'prompt_attention_mask'\].*lmbda=0"):
        ours.training_step(ours.model, batch)


# ============================================================================= 3. TRL's examples/scripts/gkd.py
def run_gkd_example(argv: list[str]):
    """The logic of TRL's `examples/scripts/gkd.py` (TRL 1.16, Apache-2.0) with only the class names changed
    (`GKDConfig` -> `AgentDistillConfig`, `GKDTrainer` -> `AgentDistillTrainer`) and `argv` for the command line."""
    from transformers import AutoTokenizer, GenerationConfig
    from trl import (
        LogCompletionsCallback,
        ModelConfig,
        ScriptArguments,
        TrlParser,
        get_peft_config,
        get_quantization_config,
    )

    parser = TrlParser((ScriptArguments, AgentDistillConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)

    model_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
        use_cache=False if training_args.gradient_checkpointing else True,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = model_kwargs

    teacher_model_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
        use_cache=True,
    )
    if quantization_config is not None:
        teacher_model_kwargs["quantization_config"] = quantization_config
    training_args.teacher_model_init_kwargs = teacher_model_kwargs

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        padding_side="left",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)

    trainer = AgentDistillTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )

    if training_args.eval_strategy != "no" and "prompt" in dataset[script_args.dataset_test_split].column_names:
        generation_config = GenerationConfig(
            max_new_tokens=training_args.max_new_tokens, do_sample=True, temperature=training_args.temperature
        )
        completions_callback = LogCompletionsCallback(trainer, generation_config, num_prompts=8)
        trainer.add_callback(completions_callback)

    trainer.train()

    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def write_splits(directory: Path, train: Dataset, test: Dataset) -> str:
    """A local dataset folder (`train.jsonl`, `test.jsonl`) that `load_dataset(folder)` reads like a hub dataset."""
    directory.mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows.to_list()))
    return str(directory)


@pytest.mark.parametrize(
    ("data", "flags"),
    [
        ("agent", []),
        ("agent", ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lmbda", "1.0", "--beta", "0.5",
                   "--max_new_tokens", "8"]),
        pytest.param("chat", []),
    ],
    ids=["agent-full", "agent-lora-on-policy", "chat-full"],
)
def test_trls_gkd_example_script_runs_with_the_class_names_changed(
    tmp_path, make_model, tiny_tokenizer, toy_dataset, data, flags
):
    models = {}
    for role in ("student", "teacher"):
        models[role] = tmp_path / role
        make_model(role).save_pretrained(models[role])
        tiny_tokenizer.save_pretrained(models[role])
    rows = toy_dataset.select_columns(["messages"]) if data == "agent" else chat_rows()
    dataset_dir = write_splits(tmp_path / "data", rows.select(range(6)), rows.select(range(6, 8)))
    output_dir = tmp_path / "gkd-model"
    trainer = run_gkd_example(
        [
            "--model_name_or_path", str(models["student"]), "--teacher_model_name_or_path", str(models["teacher"]),
            "--dataset_name", dataset_dir, "--learning_rate", "2e-4", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--output_dir", str(output_dir), "--max_steps", "2",
            "--logging_steps", "1", "--report_to", "none", *flags,
        ]
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    weights = "adapter_model.safetensors" if "--use_peft" in flags else "model.safetensors"
    assert (output_dir / weights).is_file()


# ============================================================================= 4. defaults that differ from GKD's
def differing_defaults() -> set[str]:
    """Fields of `GKDConfig` whose default differs in `AgentDistillConfig`: declared, or resolved on construction
    (`use_cpu` so that GKD's `bf16=True` can be built on any machine; it is the same for both)."""
    declared = {}
    for config_class in (GKDConfig, AgentDistillConfig):
        fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
        declared[config_class] = {
            name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for name, f in fields.items()
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
    gkd, ours = GKDConfig(output_dir="x", use_cpu=True), AgentDistillConfig(output_dir="x", use_cpu=True)
    return {
        name
        for name in declared[GKDConfig]
        if declared[GKDConfig][name] != declared[AgentDistillConfig][name] or getattr(gkd, name) != getattr(ours, name)
    }


def readme_defaults_table() -> dict[str, tuple[str, str]]:
    """`{field: (GKD default, our default)}` from the README's table under "Defaults that differ from GKDConfig"."""
    text = README.read_text()
    section = text[text.index("Defaults that differ from `GKDConfig`") :]
    table = re.search(r"\n(\|.*\|\n)+", section).group(0)
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_the_readme_lists_every_default_that_differs_from_gkd():
    table = readme_defaults_table()
    assert set(table) == differing_defaults()
    gkd, ours = GKDConfig(output_dir="x", use_cpu=True), AgentDistillConfig(output_dir="x")
    for name, (gkd_default, our_default) in table.items():
        if name != "bf16":  # resolved per machine; the table says how
            assert (gkd_default, our_default) == (f"`{getattr(gkd, name)}`", f"`{getattr(ours, name)}`")
