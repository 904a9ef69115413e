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
