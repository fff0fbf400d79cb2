import pytest
import torch

from agents.critics import (
    MLP,
    DoubleQCritic,
    QEnsemble,
    ValueNetwork,
    expectile_log_weights,
    expectile_loss,
    frozen,
    iql_q_loss,
    iql_value_loss,
    polyak_update,
    q_regression_loss,
    td_target,
)


def test_q_ensemble_shapes_broadcast_over_leading_dims():
    q = QEnsemble(obs_dim=3, act_dim=2, n=2, hidden=16, depth=2)
    assert q(torch.randn(5, 3), torch.randn(5, 2)).shape == (2, 5)
    assert q(torch.randn(5, 4, 3), torch.randn(5, 4, 2)).shape == (2, 5, 4)
    assert ValueNetwork(3, hidden=16).forward(torch.randn(6, 3)).shape == (6,)
    with pytest.raises(ValueError, match="leading dims"):
        q(torch.randn(5, 3), torch.randn(4, 2))


def test_min_is_elementwise_minimum_of_members():
    q = QEnsemble(3, 2, n=3, hidden=8)
    obs, act = torch.randn(10, 3), torch.randn(10, 2)
    assert torch.equal(q.min(obs, act), q(obs, act).min(0).values)


def test_target_starts_equal_is_frozen_and_follows_polyak():
    critic = DoubleQCritic(3, 2, hidden=16)
    trainable = {id(p) for p in critic.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in critic.q.parameters()}
    before = [p.clone() for p in critic.target.parameters()]
    with torch.no_grad():
        for p in critic.q.parameters():
            p.add_(1.0)
    critic.update_target(0.25)
    for old, new, src in zip(before, critic.target.parameters(), critic.q.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * src)
    # target_min uses the target copy, not the online networks
    obs, act = torch.randn(4, 3), torch.randn(4, 2)
    torch.testing.assert_close(critic.target_min(obs, act), critic.target(obs, act).min(0).values)
    assert not critic.target_min(obs, act).requires_grad


def test_polyak_extremes_and_bad_tau():
    a, b = MLP(2, 1, hidden=4), MLP(2, 1, hidden=4)
    polyak_update(a, b, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="tau"):
        polyak_update(a, b, 1.5)


def test_expectile_loss_known_values():
    diff = torch.tensor([-2.0, 1.0])
    torch.testing.assert_close(expectile_loss(diff, 0.7, reduction="none"), torch.tensor([0.3 * 4.0, 0.7 * 1.0]))
    torch.testing.assert_close(expectile_loss(diff, 0.7), torch.tensor(0.95))
    torch.testing.assert_close(expectile_loss(diff, 0.5), 0.5 * diff.pow(2).mean())
    with pytest.raises(ValueError, match="tau"):
        expectile_loss(diff, 1.0)


def test_expectile_regression_finds_the_expectile():
    # For data {0, 1} the tau-expectile v solves tau (1 - v) = (1 - tau) v, i.e. v = tau.
    data = torch.tensor([0.0, 1.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        expectile_loss(data - v, 0.7).backward()
        opt.step()
    assert v.item() == pytest.approx(0.7, abs=1e-4)


def test_td_target_and_q_regression():
    target = td_target(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([10.0, 10.0]), 0.9)
    torch.testing.assert_close(target, torch.tensor([10.0, 2.0]))
    q = torch.tensor([[10.0, 3.0], [8.0, 2.0]])
    # member 1: ((0)^2 + 1^2)/2 = 0.5; member 2: (4 + 0)/2 = 2
    torch.testing.assert_close(q_regression_loss(q, target), torch.tensor(2.5))


def test_iql_losses_regress_on_detached_targets():
    v = torch.tensor([0.0, 0.0], requires_grad=True)
    q_target = torch.tensor([1.0, -1.0], requires_grad=True)
    loss = iql_value_loss(v, q_target, 0.7)
    torch.testing.assert_close(loss, torch.tensor((0.7 + 0.3) / 2))
    loss.backward()
    assert q_target.grad is None and v.grad is not None
    next_v = torch.tensor([5.0, 5.0], requires_grad=True)
    q = torch.zeros(2, 2, requires_grad=True)
    loss = iql_q_loss(q, torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), next_v, gamma=0.8)
    torch.testing.assert_close(loss, torch.tensor(2 * (25.0 + 1.0) / 2))
    loss.backward()
    assert next_v.grad is None


def test_expectile_log_weights():
    adv = torch.tensor([0.5, -0.5, 0.1])
    w = expectile_log_weights(adv, 0.7).exp()
    torch.testing.assert_close(w, torch.tensor([0.7 / 0.5, 0.3 / 0.5, 0.7 / 0.1]), rtol=1e-4, atol=0)


def test_frozen_blocks_parameter_grads_but_not_input_grads():
    net = MLP(2, 1, hidden=4)
    x = torch.randn(3, 2, requires_grad=True)
    with frozen(net):
        net(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())


def test_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP(2, 1, activation="nope")
    with pytest.raises(ValueError, match="invalid MLP"):
        MLP(0, 1)
