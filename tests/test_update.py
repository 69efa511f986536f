"""An independent reference for ONE BEAR gradient step, written from docs (spec BEAR.md section 1) only.

`ReferenceBEAR` copies an agent's initial weights into its own float64 tensors and performs spec steps 1-6
plainly: explicit concatenations, loops over the K critics, the N_t target samples and the MMD pairs (i, j),
and torch's plain Adam. It imports nothing from bear-train.py. Tests that drive it are appended below it.
"""
import math

import numpy as np
import torch

VAE_KEYS = ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
            "mean.weight", "mean.bias", "log_std.weight", "log_std.bias",
            "dec_in.linear.weight", "dec_in.linear.bias", "decoder.1.weight", "decoder.1.bias",
            "decoder.3.weight", "decoder.3.bias"]
ACTOR_KEYS = ["trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias",
              "mu.weight", "mu.bias", "log_std.weight", "log_std.bias"]
CRITIC_KEYS = ["weights.0", "weights.1", "weights.2", "biases.0", "biases.1", "biases.2"]


def _copy(module, keys, trainable):
    """float64 leaf copies of the listed state_dict entries, in the listed order."""
    sd = module.state_dict()
    return {k: sd[k].detach().clone().double().requires_grad_(trainable) for k in keys}


def _linear(x, p, name):
    """nn.Linear layout: x @ W.T + b."""
    return x @ p[name + ".weight"].T + p[name + ".bias"]


class ReferenceBEAR:
    def __init__(self, agent, cfg, kernel):
        assert kernel in ("laplacian", "gaussian")
        self.cfg, self.kernel_name = cfg, kernel
        self.vae = _copy(agent.vae, VAE_KEYS, True)
        self.actor = _copy(agent.actor, ACTOR_KEYS, True)
        self.critics = _copy(agent.critics, CRITIC_KEYS, True)
        self.target_critics = _copy(agent.target_critics, CRITIC_KEYS, False)
        self.log_alpha = torch.as_tensor(agent.log_alpha).detach().clone().double().reshape(()).requires_grad_(True)
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=False, fused=False)
        self.vae_opt = adam(list(self.vae.values()), cfg.vae_lr)
        self.actor_opt = adam(list(self.actor.values()), cfg.actor_lr)
        self.critic_opt = adam(list(self.critics.values()), cfg.critic_lr)
        self.alpha_opt = adam([self.log_alpha], cfg.alpha_lr)

    # ---- networks -------------------------------------------------------------------------------------------
    def vae_encode(self, s, a):
        """Encoder (s, a) -> H -> H (ReLU); heads give mean and log-std, log-std clamped to [-4, 15]."""
        p = self.vae
        h = torch.relu(_linear(torch.cat([s, a], dim=-1), p, "encoder.0"))
        h = torch.relu(_linear(h, p, "encoder.2"))
        mean = _linear(h, p, "mean")
        log_std = torch.clamp(_linear(h, p, "log_std"), -4.0, 15.0)
        return mean, log_std

    def vae_decode_raw(self, s, z):
        """Decoder (s, z) -> H -> H (ReLU) -> linear: the *raw* action (the action is tanh(raw))."""
        p = self.vae
        h = torch.relu(_linear(torch.cat([s, z], dim=-1), p, "dec_in.linear"))
        h = torch.relu(_linear(h, p, "decoder.1"))
        return _linear(h, p, "decoder.3")

    def actor_dist(self, s):
        """Actor s -> H -> H (ReLU); heads give mu and log-std, log-std clamped to [-20, 2]."""
        p = self.actor
        h = torch.relu(_linear(s, p, "trunk.0"))
        h = torch.relu(_linear(h, p, "trunk.2"))
        mu = _linear(h, p, "mu")
        log_std = torch.clamp(_linear(h, p, "log_std"), -20.0, 2.0)
        return mu, log_std

    @staticmethod
    def critic_q(p, k, s, a):
        """Critic member k, stacked layout x @ W + b: (s, a) -> H -> H (ReLU) -> 1. Returns [B]."""
        h = torch.relu(torch.cat([s, a], dim=-1) @ p["weights.0"][k] + p["biases.0"][k])
        h = torch.relu(h @ p["weights.1"][k] + p["biases.1"][k])
        return (h @ p["weights.2"][k] + p["biases.2"][k])[..., 0]

    def kernel(self, x, y):
        """Spec kernels, sigma not squared. x, y: [B, A] -> [B]."""
        sigma = self.cfg.mmd_sigma
        if self.kernel_name == "laplacian":
            return torch.exp(-(x - y).abs().sum(dim=-1) / (2.0 * sigma))  # exp(-||x-y||_1 / (2 sigma))
        return torch.exp(-((x - y) ** 2).sum(dim=-1) / (2.0 * sigma))  # exp(-||x-y||_2^2 / (2 sigma))

    def mmd(self, X, Y):
        """MMD^2 = mean k(x,x') + mean k(y,y') - 2 mean k(x,y), over all n x n pairs incl. the diagonal;
        MMD = sqrt(MMD^2 + 1e-6). X, Y: lists of n tensors [B, A]. Returns [B]."""
        n = len(X)
        kxx = sum(self.kernel(X[i], X[j]) for i in range(n) for j in range(n)) / (n * n)
        kyy = sum(self.kernel(Y[i], Y[j]) for i in range(n) for j in range(n)) / (n * n)
        kxy = sum(self.kernel(X[i], Y[j]) for i in range(n) for j in range(n)) / (n * n)
        mmd2 = kxx + kyy - 2.0 * kxy
        return torch.sqrt(mmd2 + 1e-6)

    # ---- one gradient step ------------------------------------------------------------------------------------
    def step(self, batch, draws, warmup):
        cfg = self.cfg
        s, a, r, s2, d = batch
        K, n = cfg.num_critics, cfg.mmd_samples

        # Step 1: behaviour model. Loss = MSE(tanh(dec(s, z)), a) + w * mean KL(q(z|s,a) || N(0, I)),
        # z = mean + std * eps (reparameterisation); both terms are means over elements.
        mean, log_std = self.vae_encode(s, a)
        std = torch.exp(log_std)
        z = mean + std * draws["vae_eps"]
        recon = torch.tanh(self.vae_decode_raw(s, z))
        mse = ((recon - a) ** 2).mean()
        # KL(N(m, std^2) || N(0, 1)) per element = 0.5 * (m^2 + std^2 - 1) - log std
        kl = (0.5 * (mean ** 2 + std ** 2 - 1.0) - log_std).mean()
        vae_loss = mse + cfg.vae_kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        vae_loss.backward()
        self.vae_opt.step()

        # Step 2: critic target, no gradient. N_t actions a'_j = tanh(mu + sigma eps_j) from the current actor at s';
        # q_j = lam * min_k Qbar_k(s', a'_j) + (1 - lam) * max_k Qbar_k(s', a'_j);  y = r + gamma (1 - d) max_j q_j.
        with torch.no_grad():
            mu2, log_std2 = self.actor_dist(s2)
            q_js = []
            for j in range(cfg.num_target_samples):
                a2 = torch.tanh(mu2 + torch.exp(log_std2) * draws["target_eps"][:, j])
                q_k = torch.stack([self.critic_q(self.target_critics, k, s2, a2) for k in range(K)])  # [K, B]
                q_js.append(cfg.lam * q_k.min(dim=0).values + (1.0 - cfg.lam) * q_k.max(dim=0).values)
            y = r + cfg.gamma * (1.0 - d) * torch.stack(q_js).max(dim=0).values

        # Step 3: critics. Loss = sum_k mean_B (Q_k(s, a) - y)^2; one Adam step.
        q_online = [self.critic_q(self.critics, k, s, a) for k in range(K)]
        critic_loss = sum(((q_online[k] - y) ** 2).mean() for k in range(K))
        q_mean = torch.stack(q_online).mean().detach()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # Step 4: actor. X = n raw decoder outputs at s (updated VAE, no gradient, z clipped to [-0.5, 0.5]);
        # Y = n pre-tanh actor samples u_j = mu + sigma eps_j (with gradient).
        with torch.no_grad():
            X = [self.vae_decode_raw(s, torch.clamp(draws["prior_z"][:, i], -0.5, 0.5)) for i in range(n)]
        mu, log_std_a = self.actor_dist(s)
        std_a = torch.exp(log_std_a)
        Y = [mu + std_a * draws["actor_eps"][:, j] for j in range(n)]
        mmd = self.mmd(X, Y)  # MMD(s), [B]
        alpha = torch.exp(self.log_alpha).detach()  # alpha is a constant for this step
        if warmup:
            actor_loss = (alpha * (mmd - cfg.epsilon)).mean()  # mean_B[alpha (MMD(s) - eps)]
        else:
            # a_hat = tanh(u) of the single extra reparameterised sample, scored by the critics after step 3;
            # the critics get no gradient (detached copies of their parameters).
            a_hat = torch.tanh(mu + std_a * draws["actor_eps"][:, n])
            frozen = {key: v.detach() for key, v in self.critics.items()}
            q_pi = torch.stack([self.critic_q(frozen, k, s, a_hat) for k in range(K)])  # [K, B]
            if cfg.actor_q == "min":
                q_hat = q_pi.min(dim=0).values  # Q_hat = min_k Q_k
            elif cfg.actor_q == "mean_var":
                # Q_hat = mean_k Q_k - tau_var * var_k Q_k (population variance, divide by K)
                q_hat = q_pi.mean(dim=0) - cfg.var_penalty * q_pi.var(dim=0, unbiased=False)
            else:
                raise ValueError(cfg.actor_q)
            actor_loss = (-q_hat + alpha * (mmd - cfg.epsilon)).mean()  # mean_B[-Q_hat + alpha (MMD(s) - eps)]
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        # Step 5: dual step. Minimise -alpha (mean_B MMD(s) - eps) with step 4's MMD detached; then clamp log alpha.
        mmd_mean = mmd.detach().mean()
        alpha_loss = -torch.exp(self.log_alpha) * (mmd_mean - cfg.epsilon)
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            self.log_alpha.clamp_(cfg.log_alpha_min, cfg.log_alpha_max)

        # Step 6: Polyak averaging, target <- (1 - tau) target + tau online, for every target-critic tensor.
        with torch.no_grad():
            for key in CRITIC_KEYS:
                self.target_critics[key].copy_((1.0 - cfg.tau) * self.target_critics[key]
                                               + cfg.tau * self.critics[key])

        return {
            "vae_loss": vae_loss.item(),
            "critic_loss": critic_loss.item(),
            "actor_loss": actor_loss.item(),
            "alpha_loss": alpha_loss.item(),
            "alpha": math.exp(self.log_alpha.item()),
            "mmd": mmd_mean.item(),
            "q_mean": q_mean.item(),
        }

    # ---- read-out -----------------------------------------------------------------------------------------
    def state_dicts(self):
        detach = lambda p: {k: v.detach().clone() for k, v in p.items()}
        return {"vae": detach(self.vae), "actor": detach(self.actor), "critics": detach(self.critics),
                "target_critics": detach(self.target_critics), "log_alpha": self.log_alpha.detach().clone()}

    def adam_states(self):
        def read(opt):
            entries = []
            for p in opt.param_groups[0]["params"]:
                st = opt.state.get(p, {})
                if not st:  # never stepped (no gradient yet): Adam's zero state
                    entries.append({"exp_avg": torch.zeros_like(p.detach()),
                                    "exp_avg_sq": torch.zeros_like(p.detach()), "step": 0.0})
                    continue
                entries.append({"exp_avg": st["exp_avg"].detach().clone(),
                                "exp_avg_sq": st["exp_avg_sq"].detach().clone(), "step": float(st["step"])})
            return entries

        return {"vae_opt": read(self.vae_opt), "actor_opt": read(self.actor_opt),
                "critic_opt": read(self.critic_opt), "alpha_opt": read(self.alpha_opt)}


# ================================================================================================ the tests
# The script's update runs in float64 (its modules converted after construction) from the same weights, on a batch
# drawn by the script's replay buffer; every random number it draws is recorded (a TorchFunctionMode sees each
# torch.randint / randn / randn_like) and handed to the reference by role. The reference takes its batch from the
# data arrays themselves, by the recorded indices, so a replay buffer that mixes up rows is caught too.
import contextlib  # noqa: E402

import pytest  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from conftest import random_transitions  # noqa: E402

S, A, B, WARMUP, STEPS = 5, 2, 8, 2, 5  # two warm-up steps, then three with the Q term


class RecordDraws(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.draws = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.randint, torch.randn, torch.randn_like):
            self.draws.append(out.detach().clone())
        return out


def by_role(draws, cfg):
    """The script's draws of one step by role, told apart by shape: the batch indices [B]; the VAE's
    reparameterisation noise [B, L]; the N_t target actions' noise [B, N_t, A]; the actor's n MMD samples and its
    Q-term sample [B, n+1, A]; the behaviour model's latents for the MMD [B, n, L], before their clip."""
    n, L = cfg.mmd_samples, 2 * A
    shapes = {(B,): "idx", (B, L): "vae_eps", (B, cfg.num_target_samples, A): "target_eps", (B, n + 1, A): "actor_eps",
              (B, n, L): "prior_z"}
    assert len(shapes) == 5, "choose sizes whose draws differ in shape"
    roles = {}
    for draw in draws:
        role = shapes[tuple(draw.shape)]
        assert role not in roles, f"two draws of shape {tuple(draw.shape)} in one step"
        roles[role] = draw if role == "idx" else draw.double()
    assert sorted(roles) == sorted(shapes.values()), sorted(roles)
    return roles


def data(seed=0, n=64):
    return random_transitions(n, S, A, terminal_rate=0.3, action_bound=0.9, seed=seed)


@contextlib.contextmanager
def float64_draws():
    """The script's draws that name no dtype (torch.randn) come out float64, as its float64 networks need."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def float64_agent(bear, cfg, kernel):
    torch.manual_seed(0)
    agent = bear.BEAR(cfg, S, A, kernel, torch.device("cpu"))
    for module in (agent.vae, agent.actor, agent.critics, agent.target_critics):
        module.double()  # the Parameters stay the same objects: the optimisers and Polyak pairs follow
    agent.log_alpha.data = agent.log_alpha.data.double()
    agent.metric_sum = agent.metric_sum.double()
    for opt in (agent.vae_opt, agent.actor_opt, agent.critic_opt, agent.alpha_opt):  # the moments, made at once
        for state in opt.state.values():
            state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].double(), state["exp_avg_sq"].double()
    return agent


def compare(agent, reference, metrics_script, metrics_reference):
    want = reference.state_dicts()
    for name in ("vae", "actor", "critics", "target_critics"):
        got = getattr(agent, name).state_dict()
        assert list(got) == list(want[name])
        for key in got:
            torch.testing.assert_close(got[key], want[name][key], rtol=1e-9, atol=1e-12, msg=f"{name}.{key}")
    torch.testing.assert_close(agent.log_alpha.detach(), want["log_alpha"], rtol=1e-9, atol=1e-12)
    for opt_name, entries in reference.adam_states().items():
        opt = getattr(agent, opt_name)
        params = opt.param_groups[0]["params"]
        assert len(params) == len(entries), opt_name
        for i, (param, entry) in enumerate(zip(params, entries)):
            state = opt.state[param]
            assert float(state["step"]) == entry["step"], f"{opt_name}[{i}] step"
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[key], entry[key], rtol=1e-9, atol=1e-15, msg=f"{opt_name}[{i}].{key}")
    for key in metrics_reference:
        assert metrics_script[key] == pytest.approx(metrics_reference[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kernel", ["laplacian", "gaussian"])
@pytest.mark.parametrize("actor_q", ["min", "mean_var"])
def test_the_update_is_the_spec_step_by_step(bear, k, kernel, actor_q):
    cfg = bear.Config(num_critics=k, actor_q=actor_q, var_penalty=0.5 if actor_q == "mean_var" else 0.0,
                      actor_hidden=8, critic_hidden=8, vae_hidden=8, batch_size=B, warmup_steps=WARMUP,
                      mmd_sigma=2.0 if kernel == "gaussian" else 20.0, log_alpha_init=0.5)
    arrays = data()
    buffer = bear.ReplayBuffer(arrays, torch.device("cpu"))
    for name in ("obs", "act", "rew", "next_obs", "done"):
        setattr(buffer, name, getattr(buffer, name).double())
    agent = float64_agent(bear, cfg, kernel)
    reference = ReferenceBEAR(agent, cfg, kernel)
    torch.manual_seed(1)
    for step in range(1, STEPS + 1):
        with RecordDraws() as recorder, float64_draws():
            agent.update(buffer.sample(cfg.batch_size), step <= cfg.warmup_steps)
        draws = by_role(recorder.draws, cfg)
        idx = draws.pop("idx").numpy()
        batch = tuple(torch.as_tensor(arrays[key][idx], dtype=torch.float64)
                      for key in ("observations", "actions", "rewards", "next_observations", "terminals"))
        metrics_reference = reference.step(batch, draws, warmup=step <= WARMUP)
        metrics_script = dict(zip(bear.METRICS, agent.metric_sum.tolist()))
        agent.metric_sum.zero_()
        compare(agent, reference, metrics_script, metrics_reference)


def test_a_new_agent_starts_with_targets_equal_to_its_critics_and_optimisers_at_zero(bear):
    """The reference update above loads the agent's state; this is the state a run starts from."""
    cfg = bear.Config(num_critics=3, actor_hidden=8, critic_hidden=8, vae_hidden=8, log_alpha_init=0.5)
    agent = bear.BEAR(cfg, S, A, "laplacian", torch.device("cpu"))
    online, target = dict(agent.critics.named_parameters()), dict(agent.target_critics.named_parameters())
    assert list(online) == list(target)
    for name in online:
        assert torch.equal(online[name], target[name]), name
        assert online[name].data_ptr() != target[name].data_ptr(), f"{name}: a copy, not the same storage"
    assert not torch.equal(*agent.critics.weights[0][:2]), "the K critics start from different weights"
    for name in ("vae_opt", "actor_opt", "critic_opt", "alpha_opt"):  # Adam's state as its first step makes it
        opt = getattr(agent, name)
        assert list(opt.state) == opt.param_groups[0]["params"], name
        for p, state in opt.state.items():
            assert state["step"].dtype == torch.float32 and float(state["step"]) == 0, name
            assert not state["exp_avg"].any() and not state["exp_avg_sq"].any(), name
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape, name
    assert agent.log_alpha.item() == 0.5 and int(agent.step) == 0


class _Started(Exception):
    pass


def _initial_observations(bear, monkeypatch, seed, step=10):
    """The observations an evaluation's episodes start from; it stops before the first action."""
    cfg = bear.Config(actor_hidden=8, critic_hidden=8, eval_episodes=4, seed=seed)
    evaluator = bear.Evaluator(bear.EvalTarget("Hopper-v4", None), cfg, 11, 3)
    seen = []
    for env in evaluator.envs:
        def reset(*args, _reset=env.reset, **kwargs):
            out = _reset(*args, **kwargs)
            seen.append(np.array(out[0]))
            return out
        env.reset = reset

    def started(*args, **kwargs):
        raise _Started

    monkeypatch.setattr(bear, "select_action", started)
    with pytest.raises(_Started):
        evaluator.episodes(step)
    for env in evaluator.envs:
        env.close()
    return np.stack(seen)


def test_an_evaluations_episodes_start_from_different_states_fixed_by_the_seed(bear, monkeypatch):
    first = _initial_observations(bear, monkeypatch, seed=3)
    assert len(first) == 4
    for i in range(4):
        for j in range(i):
            assert not np.array_equal(first[i], first[j]), f"episodes {j} and {i} start from one state"
    assert np.array_equal(first, _initial_observations(bear, monkeypatch, seed=3, step=20))  # every evaluation
    assert not np.array_equal(first, _initial_observations(bear, monkeypatch, seed=4))  # another seed, other states


def test_every_mistake_of_the_mutation_check_still_applies():
    """tests/mutations.py runs by hand; this keeps its list from going stale unseen."""
    import mutations
    from conftest import SCRIPT

    source = SCRIPT.read_text()
    assert len(mutations.MUTATIONS) >= 15
    for area, mistake, old, new in mutations.MUTATIONS:
        assert source.count(old) == 1, f"{area}: {mistake}: its piece is not in bear-train.py exactly once"
        compile(source.replace(old, new), "bear-train.py", "exec")
