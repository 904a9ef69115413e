import pytest
import torch
import torch.nn.functional as F
from trl.experimental.gkd import GKDTrainer

from trl_agent_distill.losses import span_divergence_loss, token_divergence

B, T, V = 3, 7, 11


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=generator, dtype=torch.float64)
    teacher = torch.randn(B, T, V, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, :3] = -100  # prompt
    labels[2, 5:] = -100  # padding
    kinds = torch.randint(1, 3, (B, T), generator=generator) * (labels != -100)
    return student, teacher, labels, (kinds == 1).long(), (kinds == 2).long()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3])
def test_one_mask_equals_trl_generalized_jsd(batch, beta):
    student, teacher, labels, _, _ = batch
    label_mask = (labels != -100).long()
    ours = span_divergence_loss(student, teacher, label_mask, torch.zeros_like(label_mask), beta=beta).loss
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_two_masks_with_unit_weights_sum_to_the_single_mask_loss_and_gradient(batch, beta):
    student, teacher, labels, reason, act = batch
    student = student.clone().requires_grad_(True)
    ours = span_divergence_loss(student, teacher, reason, act, beta=beta, num_items_in_batch=13).loss
    (grad_ours,) = torch.autograd.grad(ours, student)
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, num_items_in_batch=13)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_ours.float(), grad_theirs.float(), atol=1e-6, rtol=1e-5)


def test_temperature_matches_trl_and_changes_the_value(batch):
    student, teacher, labels, reason, act = batch
    hot = span_divergence_loss(student, teacher, reason, act, temperature=2.0).loss
    torch.testing.assert_close(
        hot, GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=0.0, temperature=2.0).float()
    )
    assert not torch.isclose(hot, span_divergence_loss(student, teacher, reason, act).loss)


def test_lambdas_weight_each_kind(batch):
    student, teacher, _, reason, act = batch
    reason_only = span_divergence_loss(student, teacher, reason, act, lambda_reason=1.0, lambda_act=0.0).loss
    act_only = span_divergence_loss(student, teacher, reason, act, lambda_reason=0.0, lambda_act=1.0).loss
    weighted = span_divergence_loss(student, teacher, reason, act, lambda_reason=1.0, lambda_act=2.0).loss
    torch.testing.assert_close(weighted, reason_only + 2 * act_only)
    assert reason_only > 0 and act_only > 0


def test_parts_are_per_token_means_of_forward_kl(batch):
    student, teacher, _, reason, act = batch
    output = span_divergence_loss(student, teacher, reason, act)
    per_token = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="none", log_target=True).sum(-1)
    assert output.kl_reason == pytest.approx(per_token[reason.bool()].mean().item(), rel=1e-6)
    assert output.kl_act == pytest.approx(per_token[act.bool()].mean().item(), rel=1e-6)
    assert output.reason_tokens.item() == reason.sum().item()
    assert output.act_tokens.item() == act.sum().item()


def test_num_items_in_batch_normalizes(batch):
    student, teacher, _, reason, act = batch
    once = span_divergence_loss(student, teacher, reason, act, num_items_in_batch=10).loss
    twice = span_divergence_loss(student, teacher, reason, act, num_items_in_batch=20).loss
    torch.testing.assert_close(twice, once / 2)


def test_span_normalization_averages_inside_each_kind(batch):
    student, teacher, _, reason, act = batch
    output = span_divergence_loss(student, teacher, reason, act, lambda_act=3.0, span_normalization="span")
    expected = output.kl_reason + 3.0 * output.kl_act
    assert output.loss.item() == pytest.approx(expected, rel=1e-6)
    global_counts = span_divergence_loss(
        student, teacher, reason, act, span_normalization="span", span_token_counts=(100, 100)
    )
    expected_global = (global_counts.reason_sum + global_counts.act_sum) / 100
    torch.testing.assert_close(global_counts.loss, expected_global.float())


def test_cross_entropy_alone_is_sft(batch):
    student, teacher, labels, reason, act = batch
    output = span_divergence_loss(
        student, teacher, reason, act, lambda_reason=0.0, lambda_act=0.0, lambda_ce=1.0, labels=labels
    )
    expected = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected.float())
    assert output.reason_sum.item() == 0 and output.act_sum.item() == 0


def test_identical_distributions_give_zero(batch):
    student, _, _, reason, act = batch
    for beta in (0.0, 0.5, 1.0):
        assert span_divergence_loss(student, student.clone(), reason, act, beta=beta).loss.abs().item() < 1e-7


def test_no_trained_token_gives_zero_not_nan(batch):
    student, teacher, _, reason, _ = batch
    zeros = torch.zeros_like(reason)
    loss = span_divergence_loss(student.requires_grad_(True), teacher, zeros, zeros).loss
    assert loss.item() == 0.0
    loss.backward()


def test_bad_inputs_are_refused(batch):
    student, teacher, labels, reason, act = batch
    with pytest.raises(ValueError, match="overlap"):
        span_divergence_loss(student, teacher, reason, reason | act)
    with pytest.raises(ValueError, match="Shapes disagree"):
        span_divergence_loss(student, teacher, reason[:, 1:], act[:, 1:])
    with pytest.raises(ValueError, match="needs `labels`"):
        span_divergence_loss(student, teacher, reason, act, lambda_ce=1.0)
    with pytest.raises(ValueError, match="span_normalization"):
        span_divergence_loss(student, teacher, reason, act, span_normalization="sequence")
    with pytest.raises(ValueError, match="beta"):
        token_divergence(student[0], teacher[0], beta=1.5)


# ------------------------------------------------------------------ chunked path == logits path
from trl_agent_distill.heads import LogitHead  # noqa: E402
from trl_agent_distill.losses import (  # noqa: E402
    DenseTeacher,
    SparseTeacher,
    chunked_span_divergence_loss,
    sparse_token_divergence,
)

H, HT = 6, 5


def make_heads(generator, bias=False, scale=1.0, softcap=None):
    student = LogitHead(
        torch.randn(V, H, generator=generator).requires_grad_(True),
        torch.randn(V, generator=generator).requires_grad_(True) if bias else None,
        scale=scale,
        softcap=softcap,
    )
    teacher = LogitHead(torch.randn(V, HT, generator=generator) * 2, scale=scale, softcap=softcap)
    return student, teacher


def sparse_from_logits(teacher_logits, k, temperature=1.0):
    logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return SparseTeacher(ids, values, tail)


CASES = [
    dict(beta=0.0),
    dict(beta=1.0),
    dict(beta=0.5),
    dict(beta=0.3, temperature=2.0),
    dict(beta=0.0, lambda_ce=0.7, lambda_act=2.0),
    dict(beta=0.0, span_normalization="span", lambda_reason=0.5),
    dict(beta=0.5, num_items_in_batch=40),
    dict(beta=0.0, lambda_reason=0.0, lambda_act=0.0, lambda_ce=1.0),
]
HEADS = [dict(), dict(bias=True), dict(scale=0.25), dict(softcap=3.0)]


@pytest.mark.parametrize("head_kind", HEADS, ids=lambda h: ",".join(h) or "plain")
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_chunked_equals_logits_path_in_value_and_gradients(batch, case, head_kind, sparse):
    _, _, labels, reason, act = batch
    generator = torch.Generator().manual_seed(1)
    student_head, teacher_head = make_heads(generator, **head_kind)
    hidden = torch.randn(B, T, H, generator=generator).requires_grad_(True)
    teacher_hidden = torch.randn(B, T, HT, generator=generator)
    trained = (reason | act).bool()
    temperature = case.get("temperature", 1.0)
    if sparse:
        teacher_rows = sparse_from_logits(teacher_head.logits(teacher_hidden)[trained], k=4, temperature=temperature)
        reference_teacher, chunked_teacher = teacher_rows, teacher_rows
    else:
        reference_teacher = teacher_head.logits(teacher_hidden)
        chunked_teacher = DenseTeacher(teacher_hidden[trained], teacher_head)
    params = [hidden, student_head.weight] + ([student_head.bias] if student_head.bias is not None else [])

    reference = span_divergence_loss(
        student_head.logits(hidden), reference_teacher, reason, act, labels=labels, **case
    )
    reference_grads = torch.autograd.grad(reference.loss, params)
    chunked = chunked_span_divergence_loss(
        hidden, student_head, chunked_teacher, reason, act, labels=labels, chunk_size=3, **case
    )
    chunked_grads = torch.autograd.grad(chunked.loss, params)

    torch.testing.assert_close(chunked.loss, reference.loss, atol=1e-5, rtol=1e-5)
    for name in ("reason_sum", "act_sum", "ce_sum"):
        torch.testing.assert_close(getattr(chunked, name), getattr(reference, name), atol=1e-5, rtol=1e-5)
    for got, expected in zip(chunked_grads, reference_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in chunked_grads)


def test_sparse_teacher_with_every_token_in_the_top_k_is_the_dense_divergence(batch):
    student, teacher, _, _, _ = batch
    rows_s, rows_t = student.reshape(-1, V).float(), teacher.reshape(-1, V).float()
    full = sparse_from_logits(rows_t, k=V - 1)
    torch.testing.assert_close(sparse_token_divergence(rows_s, full), token_divergence(rows_s, rows_t), atol=1e-5, rtol=1e-5)
    coarse = sparse_from_logits(rows_t, k=2)
    assert (sparse_token_divergence(rows_s, coarse) <= token_divergence(rows_s, rows_t) + 1e-6).all()


def test_chunked_path_needs_a_teacher_for_a_divergence(batch):
    _, _, _, reason, act = batch
    student_head, _ = make_heads(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no teacher"):
        chunked_span_divergence_loss(torch.randn(B, T, H), student_head, None, reason, act)
