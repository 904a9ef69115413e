import os

import pytest
import torch
from datasets import Dataset

from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
from trl_agent_distill.collator import ACT, REASON, AgentTrajectoryCollator
from trl_agent_distill.segmentation import TrajectoryFormatError
from trl_agent_distill.tiny import build_tiny_model, toy_texts, train_tokenizer


def make_args(tmp_path, **overrides) -> AgentDistillConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        max_length=1024,
        disable_tqdm=True,
    )
    return AgentDistillConfig(**{**defaults, **overrides})


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_trains_logs_span_losses_evaluates_and_saves(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    args = make_args(
        tmp_path,
        max_steps=24,
        learning_rate=3e-3,
        logging_steps=4,
        eval_strategy="steps",
        eval_steps=12,
        save_strategy="steps",
        save_steps=12,
        lambda_act=2.0,
    )
    trainer = AgentDistillTrainer(
        model=make_model("student"),
        teacher_model=make_model("teacher"),
        args=args,
        train_dataset=toy_dataset,
        eval_dataset=toy_dataset.select(range(4)),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    reason, act = logged(trainer, "loss_reason"), logged(trainer, "loss_act")
    assert len(reason) == len(act) == 6
    assert reason[-1] < reason[0] and act[-1] < act[0]
    assert all(count > 0 for count in logged(trainer, "tokens_reason") + logged(trainer, "tokens_act"))
    assert logged(trainer, "eval_loss") and logged(trainer, "eval_loss_reason") and logged(trainer, "eval_loss_act")
    assert os.path.isdir(tmp_path / "out" / "checkpoint-24")
    # The logged loss is the weighted sum of the parts (token normalization, one logging step per optimizer step).
    first = next(entry for entry in trainer.state.log_history if "loss_act" in entry)
    tokens = first["tokens_reason"] + first["tokens_act"]
    expected = (first["loss_reason"] * first["tokens_reason"] + 2.0 * first["loss_act"] * first["tokens_act"]) / tokens
    assert first["loss"] == pytest.approx(expected, rel=2e-2)


def test_an_output_dir_that_cannot_be_written_fails_before_any_work(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    (tmp_path / "taken").write_text("a file where the output folder would go")
    args = make_args(tmp_path, output_dir=str(tmp_path / "taken" / "run"), save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match=r"output_dir '.*taken/run' cannot be written: .*taken is a file"):
        AgentDistillTrainer(model=make_model("student"), teacher_model=make_model("teacher"), args=args,
                            train_dataset=toy_dataset, processing_class=tiny_tokenizer)


@pytest.mark.parametrize("span_normalization", ["token", "span"])
def test_gradient_accumulation_is_exact(tmp_path, make_model, tiny_tokenizer, toy_dataset, span_normalization):
    rows = toy_dataset.select([0, 1])
    students = []
    for batch_size, accumulation in [(2, 1), (1, 2)]:
        args = make_args(
            tmp_path / f"{batch_size}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lambda_act=3.0,
            span_normalization=span_normalization,
        )
        trainer = AgentDistillTrainer(
            model=make_model("student"), teacher_model=make_model("teacher"), args=args, train_dataset=rows,
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        students.append(trainer.model)
    initial = make_model("student").state_dict()
    changed = False
    for name, after_one_batch in students[0].state_dict().items():
        torch.testing.assert_close(after_one_batch, students[1].state_dict()[name], atol=2e-6, rtol=1e-5)
        changed |= not torch.equal(after_one_batch, initial[name])
    assert changed


def test_padded_vocabularies_share_columns_and_different_ones_fail(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    args = make_args(tmp_path, max_steps=1)
    padded_teacher = make_model("teacher", vocab_size=len(tiny_tokenizer) + 64)
    trainer = AgentDistillTrainer(
        model=make_model("student"), teacher_model=padded_teacher, args=args, train_dataset=toy_dataset,
        processing_class=tiny_tokenizer,
    )
    assert trainer._shared_vocab_size == len(tiny_tokenizer)
    trainer.train()
    other_tokenizer = train_tokenizer(toy_texts(), vocab_size=300)
    foreign_teacher = build_tiny_model(other_tokenizer, hidden_size=64, num_layers=2)
    with pytest.raises(ValueError, match=rf"vocab_size {len(tiny_tokenizer)}.*vocab_size {len(other_tokenizer)}.*GOLD"):
        AgentDistillTrainer(
            model=make_model("student"), teacher_model=foreign_teacher, args=args,
            train_dataset=toy_dataset, processing_class=tiny_tokenizer,
        )


def test_loss_is_normalized_by_num_items_in_batch(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    trainer = AgentDistillTrainer(
        model=make_model("student"), teacher_model=make_model("teacher"), args=make_args(tmp_path),
        train_dataset=toy_dataset, processing_class=tiny_tokenizer,
    )
    batch = trainer.data_collator([toy_dataset[0], toy_dataset[1]])
    trained = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        local = trainer.compute_loss(trainer.model, batch)
        once = trainer.compute_loss(trainer.model, batch, num_items_in_batch=trained)
        twice = trainer.compute_loss(trainer.model, batch, num_items_in_batch=2 * trained)
    torch.testing.assert_close(once, local)
    torch.testing.assert_close(twice, once / 2)


def test_generation_config_follows_the_args(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    args = make_args(tmp_path, max_new_tokens=7, temperature=0.6)
    trainer = AgentDistillTrainer(
        model=make_model("student"), teacher_model=make_model("teacher"), args=args, train_dataset=toy_dataset,
        processing_class=tiny_tokenizer,
    )
    config = trainer.generation_config
    assert (config.max_new_tokens, config.temperature, config.do_sample) == (7, 0.6, True)
    assert config.eos_token_id == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (args.lmbda, args.beta, args.bf16) == (0.0, 0.0, False)  # offline forward KL on CPU by default


@pytest.mark.parametrize("sampling", [dict(lmbda=1.0), dict(seq_kd=True)], ids=["on_policy", "seq_kd"])
def test_generated_batches_get_fresh_masks(tmp_path, make_model, tiny_tokenizer, toy_dataset, sampling):
    args = make_args(tmp_path, max_new_tokens=12, max_steps=2, **sampling)
    trainer = AgentDistillTrainer(
        model=make_model("student"), teacher_model=make_model("teacher"), args=args, train_dataset=toy_dataset,
        processing_class=tiny_tokenizer,
    )
    generated = []
    original = trainer.generate_on_policy_outputs
    trainer.generate_on_policy_outputs = lambda *a: generated.append(1) or original(*a)
    trainer.train()
    assert len(logged(trainer, "loss")) == 2 and len(generated) == 2
    # Generated completions stop at the student's end-of-turn or max_new_tokens: at most 12 trained tokens per row.
    assert all(0 < count <= 2 * 12 for count in logged(trainer, "tokens_act"))

    prompt = tiny_tokenizer("<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    completion_text = 'Thought: count them.\nCode:\n```py\nfinal_answer(3)\n```<end_code><|im_end|>'
    completion = tiny_tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    pad = tiny_tokenizer.pad_token_id
    input_ids = torch.tensor([prompt + completion + [pad, pad]])
    attention = torch.tensor([[1] * (len(prompt) + len(completion)) + [0, 0]])
    relabeled = trainer._relabel_generated(input_ids, attention, len(prompt))
    expected = AgentTrajectoryCollator(tiny_tokenizer).completion_kinds(completion)
    kinds = relabeled["reason_mask"][0] * REASON + relabeled["act_mask"][0] * ACT
    assert kinds[: len(prompt)].sum() == 0 and kinds[-2:].sum() == 0
    assert kinds[len(prompt) : len(prompt) + len(completion)].tolist() == expected
    assert REASON in expected and ACT in expected
    assert torch.equal(relabeled["labels"][0] == -100, kinds == 0)


def test_sft_baseline_needs_no_teacher(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    args = make_args(tmp_path, lambda_reason=0.0, lambda_act=0.0, lambda_ce=1.0, max_steps=2)
    trainer = AgentDistillTrainer(
        model=make_model("student"), args=args, train_dataset=toy_dataset, processing_class=tiny_tokenizer
    )
    assert trainer.teacher_model is None
    trainer.train()
    ce = logged(trainer, "loss_ce")
    assert ce and logged(trainer, "loss")[0] == pytest.approx(ce[0], rel=1e-3)
    with pytest.raises(ValueError, match="No teacher"):
        AgentDistillTrainer(
            model=make_model("student"), args=make_args(tmp_path), train_dataset=toy_dataset,
            processing_class=tiny_tokenizer,
        )


def test_malformed_rows_fail_before_training_or_are_skipped(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    rows = toy_dataset.to_list()[:4]
    rows[2] = {**rows[2], "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "42"}]}
    dataset = Dataset.from_list(rows)
    with pytest.raises(TrajectoryFormatError) as error:
        AgentDistillTrainer(
            model=make_model("student"), teacher_model=make_model("teacher"), args=make_args(tmp_path),
            train_dataset=dataset, processing_class=tiny_tokenizer,
        )
    assert error.value.row_index == 2 and error.value.message_index == 1
    assert "on_malformed='skip'" in str(error.value)
    trainer = AgentDistillTrainer(
        model=make_model("student"), teacher_model=make_model("teacher"),
        args=make_args(tmp_path, on_malformed="skip", max_steps=1), train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    assert len(trainer.train_dataset) == 3
    trainer.train()
    assert logged(trainer, "malformed_rows_skipped") == [1]


def test_qlora_student_and_4bit_teacher_train_on_cpu(
    bnb_cpu_repacking, nf4_config, tmp_path, make_model, tiny_tokenizer, toy_dataset
):
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig

    for role in ("student", "teacher"):
        make_model(role).save_pretrained(tmp_path / role)
        tiny_tokenizer.save_pretrained(tmp_path / role)
    args = make_args(tmp_path, max_steps=3, teacher_load_in_4bit=True, learning_rate=1e-2)
    trainer = AgentDistillTrainer(
        model=str(tmp_path / "student"),
        teacher_model=str(tmp_path / "teacher"),
        args=args,
        train_dataset=toy_dataset,
        processing_class=tiny_tokenizer,
        quantization_config=nf4_config,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert isinstance(trainer.teacher_model.model.layers[0].self_attn.q_proj, Linear4bit)
    base = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, Linear4bit)
    packed_before = base.weight.data.clone()
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert isinstance(trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    assert torch.equal(base.weight.data, packed_before)  # the 4-bit base stays frozen and quantized
    changed = [n for n, p in trainer.model.named_parameters() if "lora_" in n and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before) > 0
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_and_logits_paths_agree_in_loss_and_gradients(tmp_path, make_model, tiny_tokenizer, toy_dataset, family):
    results = {}
    for implementation in ("chunked", "logits"):
        args = make_args(tmp_path, loss_implementation=implementation, lambda_act=2.0, lambda_ce=0.3, beta=0.5)
        trainer = AgentDistillTrainer(
            model=make_model("student", family=family),
            teacher_model=make_model("teacher", family=family, vocab_size=len(tiny_tokenizer) + 64),
            args=args, train_dataset=toy_dataset, processing_class=tiny_tokenizer,
        )
        assert (trainer._chunked is not None) == (implementation == "chunked")
        batch = trainer.data_collator([toy_dataset[0], toy_dataset[1]])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[implementation] = (loss.detach(), grads)
    (chunked_loss, chunked_grads), (logits_loss, logits_grads) = results["chunked"], results["logits"]
    torch.testing.assert_close(chunked_loss, logits_loss, atol=1e-5, rtol=1e-5)
    assert chunked_grads.keys() == logits_grads.keys() and "lm_head.weight" in chunked_grads
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(grad, logits_grads[name], atol=1e-5, rtol=1e-4)


def test_chunked_path_never_asks_for_full_logits(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    trainer = AgentDistillTrainer(
        model=make_model("student"), teacher_model=make_model("teacher"), args=make_args(tmp_path),
        train_dataset=toy_dataset, processing_class=tiny_tokenizer,
    )
    shapes = []
    for module in (trainer.model.lm_head, trainer.teacher_model.lm_head):
        module.register_forward_hook(lambda mod, inputs, output: shapes.append(tuple(output.shape)))
    batch = trainer.data_collator([toy_dataset[0], toy_dataset[1]])
    trainer.compute_loss(trainer.model, batch).backward()
    assert len(shapes) == 2 and all(shape[1] == 1 for shape in shapes)


def test_unknown_model_families_fall_back_to_logits(tmp_path, tiny_tokenizer, toy_dataset, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(seed):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=2048)
        return GPT2LMHeadModel(config)

    with caplog.at_level("WARNING"):
        trainer = AgentDistillTrainer(
            model=gpt2(0), teacher_model=gpt2(1), args=make_args(tmp_path, max_steps=1), train_dataset=toy_dataset,
            processing_class=tiny_tokenizer,
        )
    assert trainer._chunked is None and "loss_implementation='logits'" in caplog.text
    trainer.train()
    assert logged(trainer, "loss_act")
