import math

import torch
from torch.testing import assert_close

from groupdistil.weighting import GroupWeights, group_sums, reduced_group_means


def test_group_means_match_python_loop():
    """The group sums, means (0 for an absent group) and counts of reduced_group_means, and the ones GroupWeights
    logs, equal a Python loop over the samples."""
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(50, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 5, (50,), generator=g)
    groups[groups == 3] = 2  # group 3 absent
    sums, means, counts = reduced_group_means(losses, groups, 5)
    _, logs = GroupWeights(5, eta=0.1)(losses, groups)
    members = [[losses[i].item() for i in range(50) if groups[i].item() == k] for k in range(5)]
    assert members[3] == [] and all(members[k] for k in (0, 1, 2, 4))
    for k in range(5):
        want = sum(members[k]) / len(members[k]) if members[k] else 0.0
        assert counts[k].item() == len(members[k]) == logs["group_count"][k].item()
        assert math.isclose(sums[k].item(), sum(members[k]), rel_tol=1e-12)
        assert math.isclose(means[k].item(), want, rel_tol=1e-12)
        assert math.isclose(logs["group_loss"][k].item(), want, rel_tol=1e-6)  # GroupWeights works in float32


def test_one_eg_step_by_hand():
    w = GroupWeights(3, eta=0.5)
    losses = torch.tensor([1.0, 3.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 1, 2])
    _, logs = w(losses, groups)
    # l = (2, 2, 2): every weight moves by the same factor exp(0.5 * 2), so q stays uniform
    assert_close(logs["group_loss"], torch.tensor([2.0, 2.0, 2.0]))
    assert_close(logs["group_weight"], torch.full((3,), 1 / 3))
    # group means that differ:
    w = GroupWeights(3, eta=0.5)
    losses = torch.tensor([1.0, 3.0, 4.0, 0.5])
    _, logs = w(losses, groups)
    raw = [math.exp(0.5 * 2.0), math.exp(0.5 * 4.0), math.exp(0.5 * 0.5)]
    expected = torch.tensor([r / sum(raw) for r in raw])
    assert_close(logs["group_weight"], expected)
    assert_close(logs["group_loss"], torch.tensor([2.0, 4.0, 0.5]))
    assert_close(logs["group_count"], torch.tensor([2.0, 1.0, 1.0]))
    assert math.isclose(w.q.sum().item(), 1.0, rel_tol=1e-6)


def test_absent_group_keeps_unnormalised_weight():
    w = GroupWeights(3, eta=1.0)
    losses = torch.tensor([1.0, 2.0])
    groups = torch.tensor([0, 1])
    _, logs = w(losses, groups)
    raw = [math.exp(1.0), math.exp(2.0), 1.0]  # group 2 absent: exp(0)
    assert_close(logs["group_weight"], torch.tensor([r / sum(raw) for r in raw]))
    assert logs["group_loss"][2].item() == 0.0 and logs["group_count"][2].item() == 0.0


def test_objective_is_weighted_sum_and_no_gradient_through_q():
    w = GroupWeights(2, eta=0.1)
    losses = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    groups = torch.tensor([0, 0, 1])
    obj, logs = w(losses, groups)
    q = logs["group_weight"]
    assert_close(obj, q[0] * 1.5 + q[1] * 4.0)
    obj.backward()
    assert_close(losses.grad, torch.stack([q[0] / 2, q[0] / 2, q[1]]))
    assert not w.log_q.requires_grad


def test_generalisation_adjustment_affects_update_only():
    counts = [100, 4]
    w = GroupWeights(2, eta=1.0, adj_c=2.0, train_counts=counts)
    losses = torch.tensor([1.0, 1.0])
    groups = torch.tensor([0, 1])
    obj, logs = w(losses, groups)
    raw = [math.exp(1.0 + 2.0 / 10.0), math.exp(1.0 + 2.0 / 2.0)]
    assert_close(logs["group_weight"], torch.tensor([r / sum(raw) for r in raw]))
    assert_close(logs["group_loss"], torch.tensor([1.0, 1.0]))  # returned losses carry no adjustment
    assert_close(obj, (logs["group_weight"] * 1.0).sum())


def test_weights_sum_to_one_over_many_steps_and_start_uniform():
    w = GroupWeights(4, eta=0.3)
    assert_close(w.q, torch.full((4,), 0.25))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        w(torch.rand(16, generator=g) * 5, torch.randint(0, 4, (16,), generator=g))
        assert math.isclose(w.q.sum().item(), 1.0, rel_tol=1e-5)


def test_weights_are_in_state_dict():
    w = GroupWeights(3, eta=0.5)
    w(torch.tensor([5.0, 0.0, 0.0]), torch.tensor([0, 1, 2]))
    w2 = GroupWeights(3, eta=0.5)
    w2.load_state_dict(w.state_dict())
    assert_close(w2.q, w.q)


def test_reduce_hook_sees_sums_and_counts():
    seen = []

    def reduce(t):
        seen.append(t.clone())
        return t * 2  # as if a second identical process contributed

    w = GroupWeights(2, eta=0.1)
    losses, groups = torch.tensor([1.0, 3.0]), torch.tensor([0, 1])
    _, logs = w(losses, groups, reduce=reduce)
    assert_close(seen[0], torch.stack(group_sums(losses, groups, 2)))
    assert_close(logs["group_count"], torch.tensor([2.0, 2.0]))
    assert_close(logs["group_loss"], torch.tensor([1.0, 3.0]))


def test_normalize_loss_by_hand():
    """normalize_loss divides the adjusted losses of the present groups by their sum (group_DRO's order: the
    adjustment first), then takes the EG step."""
    w = GroupWeights(3, eta=2.0, adj_c=1.0, train_counts=[4, 16, 9], normalize_loss=True)
    losses = torch.tensor([1.0, 3.0, 2.0])
    groups = torch.tensor([0, 0, 1])  # group 2 absent
    _, logs = w(losses, groups)
    a = [2.0 + 1 / 2, 2.0 + 1 / 4]  # l_g + C / sqrt(n_g) for the present groups 0 and 1
    a = [x / sum(a) for x in a]
    raw = [math.exp(2.0 * a[0]), math.exp(2.0 * a[1]), 1.0]
    assert_close(logs["group_weight"], torch.tensor([r / sum(raw) for r in raw]))
    assert_close(logs["group_loss"], torch.tensor([2.0, 2.0, 0.0]))  # logged: the plain group means


def test_groups_without_training_samples_are_out_of_the_simplex():
    w = GroupWeights(3, eta=1.0, train_counts=[5, 0, 2])
    assert_close(w.q, torch.tensor([0.5, 0.0, 0.5]))
    for losses, groups in ((torch.tensor([1.0, 3.0]), torch.tensor([0, 2])), (torch.tensor([2.0]), torch.tensor([0]))):
        obj, logs = w(losses, groups)
        q = logs["group_weight"]
        assert q[1].item() == 0.0 and math.isclose(float(q[0] + q[2]), 1.0, rel_tol=1e-6)
        assert torch.isfinite(obj)
    raw = [math.exp(1.0 + 2.0), math.exp(3.0)]  # two EG steps of group 0 (losses 1, 2), one of group 2 (loss 3)
    assert_close(w.q, torch.tensor([raw[0] / sum(raw), 0.0, raw[1] / sum(raw)]))
