from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
from trl_agent_distill.collator import AgentTrajectoryCollator
from trl_agent_distill.encoding import encode_dataset
from trl_agent_distill.teacher_cache import (
    TeacherCacheError,
    build_teacher_cache,
    load_teacher_cache,
    run_fingerprint,
)

MAX_LENGTH = 1024


def encode(tokenizer, dataset):
    """The dataset as the trainer encodes it (a cache belongs to encoded rows)."""
    return encode_dataset(dataset, AgentTrajectoryCollator(tokenizer, max_length=MAX_LENGTH))[0]


def fingerprint_for(tokenizer, dataset, topk, teacher="tiny-teacher", **overrides):
    settings = dict(
        teacher_model_name_or_path=teacher, teacher_cache_topk=topk, max_length=MAX_LENGTH,
        segmentation_style="auto", loss_temperature=1.0,
    )
    return run_fingerprint(SimpleNamespace(**{**settings, **overrides}), tokenizer, encode(tokenizer, dataset))


def build(path, teacher, tokenizer, dataset, topk=8, **kwargs):
    collator = AgentTrajectoryCollator(tokenizer, max_length=MAX_LENGTH)
    fingerprint = fingerprint_for(tokenizer, dataset, topk)
    return build_teacher_cache(
        teacher, collator, encode(tokenizer, dataset), path, fingerprint, batch_size=2, shard_rows=4,
        show_progress=False, **kwargs
    )


@pytest.fixture
def teacher(make_model):
    return make_model("teacher")


def test_cache_holds_the_teachers_top_k_at_trained_positions(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    dataset = toy_dataset.select(range(6))
    build(tmp_path, teacher, tiny_tokenizer, dataset)
    rows, fingerprint = load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, dataset, topk=8))
    assert len(rows) == 6 and fingerprint.topk == 8
    batch = AgentTrajectoryCollator(tiny_tokenizer, max_length=MAX_LENGTH)([dataset[3]])
    trained = (batch["reason_mask"][0, 1:] | batch["act_mask"][0, 1:]).bool()
    with torch.no_grad():
        logp = F.log_softmax(teacher(input_ids=batch["input_ids"]).logits[0, :-1][trained], dim=-1)
    values, ids = logp.topk(8, dim=-1)
    cached = rows[3]
    assert len(cached["teacher_tail_logprob"]) == int(trained.sum())
    assert torch.equal(torch.tensor(cached["teacher_topk_ids"]).view(-1, 8), ids)
    torch.testing.assert_close(torch.tensor(cached["teacher_topk_logprobs"]).view(-1, 8), values, atol=1e-2, rtol=1e-3)
    tail = torch.log1p(-values.exp().sum(-1))
    torch.testing.assert_close(torch.tensor(cached["teacher_tail_logprob"]), tail, atol=1e-4, rtol=1e-4)


def test_cache_costs_at_most_400_bytes_per_trained_token_at_k64(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset, topk=64)
    rows, _ = load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, toy_dataset, topk=64))
    tokens = sum(len(tail) for tail in rows["teacher_tail_logprob"])
    size = sum(path.stat().st_size for path in Path(tmp_path).rglob("*.arrow"))
    assert tokens > 1000 and size / tokens <= 400, size / tokens


def test_a_resumed_build_recomputes_only_missing_shards(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)
    (tmp_path / "shard-00002.sha256").unlink()  # interrupted before this shard was sealed
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)
    assert len(calls) == 2  # shard 2 has 4 rows: two batches of two
    load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, toy_dataset, topk=8))


def test_a_truncated_shard_is_refused_then_rebuilt(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)
    arrow = next((tmp_path / "shard-00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    expected = fingerprint_for(tiny_tokenizer, toy_dataset, topk=8)
    with pytest.raises(TeacherCacheError, match="Shard 1 .* damaged"):
        load_teacher_cache(tmp_path, expected)
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)
    rows, _ = load_teacher_cache(tmp_path, expected)
    assert len(rows) == len(toy_dataset)


def test_shards_split_across_processes(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset, process_index=0, num_processes=2)
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == ["shard-00000.sha256", "shard-00002.sha256"]
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset, process_index=1, num_processes=2)
    rows, _ = load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, toy_dataset, topk=8))
    assert len(rows) == len(toy_dataset)


def test_a_build_with_other_shard_rows_is_refused_and_leaves_the_cache_intact(tmp_path, teacher, tiny_tokenizer,
                                                                              toy_dataset):
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)  # shards of 4 rows
    (tmp_path / "shard-00003.sha256").unlink()  # interrupted before the last shard was sealed
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=MAX_LENGTH)
    with pytest.raises(TeacherCacheError, match=r"shards of 4 rows, this run asks for 8 \(teacher_cache_shard_rows\)"):
        build_teacher_cache(teacher, collator, encode(tiny_tokenizer, toy_dataset), tmp_path,
                            fingerprint_for(tiny_tokenizer, toy_dataset, topk=8), shard_rows=8, show_progress=False)
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)  # resumed with the cache's own cut
    rows, _ = load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, toy_dataset, topk=8))
    assert len(rows) == len(toy_dataset)


def test_an_emptied_fingerprint_is_named_with_what_to_do(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)
    (tmp_path / "fingerprint.json").write_text("")
    with pytest.raises(ValueError, match=r"fingerprint.json is empty.*run `trl-agent-distill cache-teacher` again"):
        load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, toy_dataset, topk=8))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(max_length=512), "max_length"),
        (dict(segmentation_style="codeact"), "segmentation_style"),
        (dict(loss_temperature=2.0), "temperature"),
    ],
)
def test_a_cache_for_another_run_is_refused_naming_the_field(tmp_path, teacher, tiny_tokenizer, toy_dataset, change, field):
    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)
    with pytest.raises(TeacherCacheError, match=rf"{field}: cache has"):
        load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, toy_dataset, topk=8, **change))


def test_other_data_tokenizer_or_teacher_are_refused(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    from trl_agent_distill.tiny import toy_texts, train_tokenizer

    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)
    with pytest.raises(TeacherCacheError, match="dataset: cache has"):
        load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, toy_dataset.select(range(1, 14)), topk=8))
    with pytest.raises(TeacherCacheError, match="tokenizer: cache has"):
        load_teacher_cache(tmp_path, fingerprint_for(train_tokenizer(toy_texts(), vocab_size=300), toy_dataset, topk=8))
    other_teacher = fingerprint_for(tiny_tokenizer, toy_dataset, topk=8, teacher="another-teacher")
    with pytest.raises(TeacherCacheError, match="teacher: cache has 'tiny-teacher'"):
        load_teacher_cache(tmp_path, other_teacher)
    with pytest.raises(TeacherCacheError, match="for another run"):
        build_teacher_cache(
            teacher, AgentTrajectoryCollator(tiny_tokenizer), encode(tiny_tokenizer, toy_dataset), tmp_path,
            other_teacher, show_progress=False,
        )


def test_nan_in_the_teacher_stops_the_build_naming_the_row(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    with torch.no_grad():
        teacher.lm_head.weight[:, 0] = float("nan")
    with pytest.raises(TeacherCacheError, match="dataset row 0"):
        build(tmp_path, teacher, tiny_tokenizer, toy_dataset)


def test_a_cache_whose_rows_do_not_fit_the_trained_tokens_is_refused_naming_the_row(tmp_path, teacher, tiny_tokenizer, toy_dataset):
    from trl_agent_distill.encoding import trained_token_counts
    from trl_agent_distill.teacher_cache import attach_teacher_cache

    build(tmp_path, teacher, tiny_tokenizer, toy_dataset)
    rows, _ = load_teacher_cache(tmp_path, fingerprint_for(tiny_tokenizer, toy_dataset, topk=8))
    encoded = encode(tiny_tokenizer, toy_dataset)
    attached = attach_teacher_cache(encoded, rows)
    assert [len(tail) for tail in attached["teacher_tail_logprob"]] == trained_token_counts(encoded).tolist()
    counts = trained_token_counts(encoded)
    other = next(i for i in range(1, len(counts)) if counts[i] != counts[0])
    swapped = encoded.select([other, *[i for i in range(len(encoded)) if i != other]])
    with pytest.raises(TeacherCacheError, match=rf"Row 0 of the dataset has {counts[other]} trained tokens but the "
                       rf"teacher cache holds {counts[0]} positions"):
        attach_teacher_cache(swapped, rows)


def train_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", max_length=MAX_LENGTH,
        disable_tqdm=True, teacher_model_name_or_path="tiny-teacher",
    )
    return AgentDistillConfig(**{**defaults, **overrides})


@pytest.mark.parametrize("implementation", ["chunked", "logits"])
def test_training_from_a_full_vocabulary_cache_matches_the_live_teacher(
    tmp_path, make_model, teacher, tiny_tokenizer, toy_dataset, implementation
):
    dataset = toy_dataset.select(range(4))
    topk = len(tiny_tokenizer) - 1  # everything but one token: the sparse teacher is the dense one
    build(tmp_path / "cache", teacher, tiny_tokenizer, dataset, topk=topk)
    cached = AgentDistillTrainer(
        model=make_model("student"),
        args=train_args(tmp_path, teacher_cache=str(tmp_path / "cache"), loss_implementation=implementation),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    assert cached.teacher_model is None
    live = AgentDistillTrainer(
        model=make_model("student"), teacher_model=teacher, args=train_args(tmp_path, loss_implementation=implementation),
        train_dataset=dataset, processing_class=tiny_tokenizer,
    )
    rows = [cached.train_dataset[0], cached.train_dataset[1]]
    with torch.no_grad():
        cached_loss = cached.compute_loss(cached.model, cached.data_collator(rows))
        live_loss = live.compute_loss(live.model, live.data_collator([dataset[0], dataset[1]]))
    torch.testing.assert_close(cached_loss, live_loss, rtol=2e-3, atol=1e-4)
    cached.train()
    assert cached.state.log_history[0]["loss_act"] > 0


def test_cache_and_cli_round_trip(tmp_path):
    from trl_agent_distill.cli import main, run

    root = Path(__file__).resolve().parents[1]
    toy = tmp_path / "toy"
    main(["init-tiny", "--output_dir", str(toy), "--teacher_sft_steps", "0"])
    common = [
        "--config", str(root / "recipes/toy_cpu.yaml"),
        "--model_name_or_path", str(toy / "student"), "--teacher_model_name_or_path", str(toy / "teacher"),
        "--dataset_name", str(root / "trl_agent_distill/resources/toy_trajectories.jsonl"),
        "--teacher_cache", str(tmp_path / "cache"), "--teacher_cache_topk", "16",
    ]
    main(["cache-teacher", *common])
    assert (tmp_path / "cache" / "fingerprint.json").is_file()
    trainer = run(["train", *common, "--output_dir", str(tmp_path / "out"), "--max_steps", "2"])
    assert trainer.teacher_model is None and trainer._cache_topk == 16
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_batch_without_trained_tokens_gives_a_zero_loss_from_the_cache():
    """Every row truncated before its first assistant token: the batch carries no cached rows at all."""
    from trl_agent_distill.heads import LogitHead
    from trl_agent_distill.losses import chunked_span_divergence_loss, span_divergence_loss
    from trl_agent_distill.teacher_cache import sparse_teacher_from_batch

    empty = {"teacher_topk_ids": torch.zeros(0, dtype=torch.int32),
             "teacher_topk_logprobs": torch.zeros(0), "teacher_tail_logprob": torch.zeros(0)}
    teacher = sparse_teacher_from_batch(empty)
    assert teacher.topk_ids.shape[0] == 0
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = LogitHead(weight=torch.randn(16, 8))
    masks = (torch.zeros(2, 5), torch.zeros(2, 5))
    for output in (chunked_span_divergence_loss(hidden, head, teacher, *masks),
                   span_divergence_loss(hidden @ head.weight.T, teacher, *masks)):
        assert torch.isfinite(output.loss) and output.loss.item() == 0.0
        output.loss.backward()
