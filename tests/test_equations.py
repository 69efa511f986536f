"""Each BEAR equation against an independent computation written here (spec section 1)."""
import itertools
import math

import numpy as np
import pytest
import torch


def test_laplacian_and_gaussian_kernels_on_hand_made_inputs(bear):
    x = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])  # [B=1, n=2, A=2]
    y = torch.tensor([[[1.0, -1.0]]])  # [B=1, m=1, A=2]
    sigma = 1.5
    # L1 distances: |0-1|+|0+1| = 2 and |1-1|+|2+1| = 3; squared L2 distances: 2 and 9.
    lap = bear.laplacian_kernel(x, y, sigma)
    gau = bear.gaussian_kernel(x, y, sigma)
    assert lap.shape == (1, 2, 1)
    assert lap.flatten().tolist() == pytest.approx([math.exp(-2 / 3), math.exp(-3 / 3)])
    assert gau.flatten().tolist() == pytest.approx([math.exp(-2 / 3), math.exp(-9 / 3)])


def reference_mmd(x, y, kernel, sigma):
    """Per state, with plain loops over all n x n pairs (diagonal included)."""
    def k(p, q):
        diff = np.asarray(p, float) - np.asarray(q, float)
        dist = np.abs(diff).sum() if kernel == "laplacian" else (diff ** 2).sum()
        return math.exp(-dist / (2 * sigma))

    out = []
    for xs, ys in zip(x.tolist(), y.tolist()):
        kxx = np.mean([k(p, q) for p, q in itertools.product(xs, xs)])
        kyy = np.mean([k(p, q) for p, q in itertools.product(ys, ys)])
        kxy = np.mean([k(p, q) for p, q in itertools.product(xs, ys)])
        out.append(math.sqrt(kxx + kyy - 2 * kxy + 1e-6))
    return out


@pytest.mark.parametrize("kernel", ["laplacian", "gaussian"])
def test_mmd_matches_pairwise_loops(bear, kernel):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64) * 2 + 1
    got = bear.mmd(x, y, bear.KERNELS[kernel], 2.0)
    assert got.tolist() == pytest.approx(reference_mmd(x, y, kernel, 2.0), rel=1e-9)


@pytest.mark.parametrize("kernel", ["laplacian", "gaussian"])
def test_mmd_gradient_matches_the_broadcast_formula(bear, kernel):
    """The actor learns through d MMD / d y, the k(y, y') diagonal (zero distance) included: the kernels' gradient
    must equal that of the plain broadcast-difference formula, and be finite."""
    def plain(a, b, sigma):
        diff = a[:, :, None] - b[:, None]
        dist = diff.abs().sum(-1) if kernel == "laplacian" else diff.pow(2).sum(-1)
        return torch.exp(-dist / (2 * sigma))

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(bear.mmd(x, y, bear.KERNELS[kernel], 3.0).sum(), y)
    (want,) = torch.autograd.grad(bear.mmd(x, y, plain, 3.0).sum(), y)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel", ["laplacian", "gaussian"])
def test_mmd_of_a_sample_set_with_itself_is_the_jitter(bear, kernel):
    x = torch.randn(7, 4, 6, dtype=torch.float64)
    got = bear.mmd(x, x.clone(), bear.KERNELS[kernel], 20.0)
    assert got.tolist() == pytest.approx([math.sqrt(1e-6)] * 7, rel=1e-6)
    far = bear.mmd(x, x + 50, bear.KERNELS[kernel], 20.0)
    assert (far > 0.5).all()


def test_target_mixes_min_and_max_over_critics_then_maxes_over_samples(bear):
    q_next = torch.tensor([  # [K=2, B=2, N_t=3]
        [[1.0, 5.0, 2.0], [0.0, -1.0, 3.0]],
        [[2.0, 1.0, 4.0], [1.0, 2.0, 0.5]],
    ])
    reward, done = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 1.0])
    lam, gamma = 0.75, 0.9
    expected = []
    for b in range(2):
        mixed = [lam * min(q_next[0, b, j], q_next[1, b, j]) + (1 - lam) * max(q_next[0, b, j], q_next[1, b, j])
                 for j in range(3)]
        expected.append(float(reward[b] + gamma * (1 - done[b]) * max(mixed)))
    # state 0: mixes are 1.25, 2.0, 2.5 -> 0.5 + 0.9 * 2.5; state 1 is terminal -> the reward alone
    assert expected == pytest.approx([0.5 + 0.9 * 2.5, -1.0])
    assert bear.critic_target(q_next, reward, done, lam, gamma).tolist() == pytest.approx(expected)


def test_actor_q_rules(bear):
    q = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])  # [K=3, B=2]
    assert bear.actor_q_term(q, "min", 0.0).tolist() == [1.0, 0.0]
    var = [np.var([1, 3, 2]), np.var([4, 0, 2])]
    assert bear.actor_q_term(q, "mean_var", 0.5).tolist() == pytest.approx([2 - 0.5 * var[0], 2 - 0.5 * var[1]])


def make_agent(bear, **overrides):
    cfg = bear.Config(actor_hidden=16, critic_hidden=16, vae_hidden=16, **overrides)
    torch.manual_seed(0)
    return bear.BEAR(cfg, state_dim=3, action_dim=2, kernel="laplacian", device=torch.device("cpu"))


def test_dual_step_raises_alpha_above_epsilon_lowers_it_below_and_stays_clamped(bear):
    for value, direction in ((0.3, 1), (0.01, -1)):  # MMD above eps = 0.05, then (a fresh agent) below it
        agent = make_agent(bear)
        log_alphas = [agent.log_alpha.item()]
        for _ in range(5):
            agent.dual_step(torch.full((8,), value))
            log_alphas.append(agent.log_alpha.item())
        assert all(direction * (b - a) > 0 for a, b in zip(log_alphas, log_alphas[1:]))
        assert log_alphas[1] == pytest.approx(direction * 1e-3, rel=1e-3)  # Adam's first step is about the lr

    agent = make_agent(bear, log_alpha_init=9.9995, alpha_lr=0.1)
    for _ in range(20):
        agent.dual_step(torch.full((8,), 1.0))
        assert agent.log_alpha.item() == pytest.approx(10.0)  # clamped at log alpha = 10
    agent = make_agent(bear, log_alpha_init=-4.9995, alpha_lr=0.1)
    for _ in range(20):
        agent.dual_step(torch.full((8,), 0.0))
        assert agent.log_alpha.item() == pytest.approx(-5.0)


def test_dual_step_uses_the_detached_mmd(bear):
    agent = make_agent(bear)
    mmd_value = torch.full((4,), 0.3, requires_grad=True)
    agent.dual_step(mmd_value)
    assert mmd_value.grad is None


def test_evaluation_action_is_the_candidate_with_the_highest_ensemble_mean_q(bear):
    agent = make_agent(bear, num_critics=3, eval_candidates=50)
    s = torch.randn(4, 3)
    chosen = agent.act(s, torch.Generator().manual_seed(7))
    candidates = torch.tanh(agent.actor.sample(s, 50, torch.Generator().manual_seed(7)))  # the same draws
    with torch.no_grad():
        q = torch.stack([  # each critic evaluated on its own, pair by pair
            torch.stack([agent.critics(s[e:e + 1], candidates[e:e + 1, j])[:, 0] for j in range(50)], 1)
            for e in range(4)], 1)  # [K, E, 50]
    mean_q = q.mean(0)
    best = mean_q.argmax(1)
    assert torch.allclose(chosen, candidates[torch.arange(4), best])
    # not the rule of a single critic: for at least one state, Q_1 alone would pick another candidate here
    assert (q[0].argmax(1) != best).any()


def test_ensemble_members_are_independent_networks(bear):
    agent = make_agent(bear, num_critics=5)
    s, a = torch.randn(6, 3), torch.rand(6, 2) * 2 - 1
    q = agent.critics(s, a)  # [K, B]
    assert q.shape == (5, 6)
    w1, w2, w3 = agent.critics.weights
    b1, b2, b3 = agent.critics.biases  # [K, out]
    for k in range(5):  # member k as a plain MLP on [s, a]
        h = torch.relu(torch.cat([s, a], 1) @ w1[k] + b1[k])
        h = torch.relu(h @ w2[k] + b2[k])
        assert torch.allclose(q[k], (h @ w3[k] + b3[k])[:, 0], atol=1e-6)
    many = agent.critics(s, torch.stack([a, -a], 1))  # [K, B, 2]: n actions per state share the state part
    assert torch.allclose(many[..., 0], q, atol=1e-6)
    assert torch.allclose(many[..., 1], agent.critics(s, -a), atol=1e-6)


def test_vae_loss_is_mse_of_tanh_decoder_plus_half_kl(bear):
    agent = make_agent(bear)
    vae = agent.vae
    s, a = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    torch.manual_seed(3)
    got = vae.loss(s, a, 0.5)
    torch.manual_seed(3)
    h = vae.encoder(torch.cat([s, a], 1))
    mean, log_std = vae.mean(h), vae.log_std(h).clamp(-4, 15)
    z = mean + log_std.exp() * torch.randn_like(mean)
    dec = vae.decoder(vae.dec_in.linear(torch.cat([s, z], 1)))  # the decoder as one layer on [s, z]
    recon = ((torch.tanh(dec) - a) ** 2).mean()
    kl = (0.5 * (mean ** 2 + log_std.exp() ** 2 - 1) - log_std).mean()  # KL(N(m, s^2) || N(0, 1)) per element
    assert got.item() == pytest.approx((recon + 0.5 * kl).item(), rel=1e-5)
    # n latents per state (the MMD's samples: the state part computed once) decode as one latent at a time does
    zs = torch.randn(5, 3, z.shape[1])
    many = vae.decode_raw(s, zs)  # [B, n, A]
    for j in range(3):
        assert torch.allclose(many[:, j], vae.decode_raw(s, zs[:, j]), atol=1e-6)


def test_the_actors_log_std_is_clamped_at_both_ends(bear):
    """log sigma of pi is clamped to [-20, 2]: a log-std layer whose bias is +50 (or -50) gives std exp(2) (or
    exp(-20)): with the mean at 0 every sample is that std times its normal draw."""
    agent = make_agent(bear)
    actor = agent.actor
    s = torch.randn(4, 3)
    eps = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(5))
    for bias, log_std in ((50.0, 2.0), (-50.0, -20.0)):
        with torch.no_grad():
            actor.log_std.weight.zero_()
            actor.log_std.bias.fill_(bias)
            actor.mu.weight.zero_()  # mean 0, so that even a std of exp(-20) shows in float32
            actor.mu.bias.zero_()
            u = actor.sample(s, 3, torch.Generator().manual_seed(5))
        std = u / eps
        torch.testing.assert_close(std, torch.full_like(std, math.exp(log_std)), rtol=1e-4, atol=0)


def test_the_vaes_log_std_is_clamped_at_both_ends(bear):
    """log sigma of the VAE's encoder is clamped to [-4, 15] in its loss: past either end the KL is that of the
    clamped std."""
    agent = make_agent(bear)
    vae = agent.vae
    s, a = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    for bias, log_std in ((50.0, 15.0), (-50.0, -4.0)):
        with torch.no_grad():
            vae.log_std.weight.zero_()
            vae.log_std.bias.fill_(bias)
            mean = vae.mean(vae.encoder(torch.cat([s, a], 1)))
            torch.manual_seed(3)
            got = vae.loss(s, a, 1.0)
            torch.manual_seed(3)
            z = mean + math.exp(log_std) * torch.randn_like(mean)
            recon = ((torch.tanh(vae.decoder(vae.dec_in.linear(torch.cat([s, z], 1)))) - a) ** 2).mean()
            kl = (0.5 * (mean ** 2 + math.exp(2 * log_std) - 1) - log_std).mean()
        assert got.item() == pytest.approx((recon + kl).item(), rel=1e-5)
