"""Mutation check of the fast update tests (run by hand, not in CI): realistic mistakes in BEAR, each applied to a
copy of bear-train.py on its own; the fast tests must fail on every one.

    python tests/mutations.py            # about 15 minutes on 2 cores
    python tests/mutations.py --list     # the mistakes only

Each mutation is an exact piece of bear-train.py and what a reviewer's mistake would make of it. A mutation whose
piece is no longer in the script (the code moved on) is reported STALE and fails the run, like a missed one.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["tests/test_update.py", "tests/test_equations.py", "tests/test_data.py::test_replay_buffer_samples_on_the_device",
        "tests/test_prepare.py::test_the_recipe_is_pinned_by_a_digest",
        # it checks that each mutation's piece is in the script, so it fails on every mutant: it must not count
        "--deselect", "tests/test_update.py::test_every_mistake_of_the_mutation_check_still_applies"]

MUTATIONS = [  # (area, mistake, piece of the script, what the mistake makes of it)
    ("target", "lambda and 1 - lambda swapped",
     "mixed = lam * q_next.min(0).values + (1 - lam) * q_next.max(0).values",
     "mixed = (1 - lam) * q_next.min(0).values + lam * q_next.max(0).values"),
    ("target", "computed from the online critics instead of the target critics",
     "y = critic_target(self.target_critics(s2, a2), r, d, cfg.lam, cfg.gamma)",
     "y = critic_target(self.critics(s2, a2), r, d, cfg.lam, cfg.gamma)"),
    ("target", "the mean over the N_t sampled actions instead of their max",
     "return reward + gamma * (1 - done) * mixed.max(1).values",
     "return reward + gamma * (1 - done) * mixed.mean(1)"),
    ("target", "terminations ignored (no 1 - d)",
     "return reward + gamma * (1 - done) * mixed.max(1).values",
     "return reward + gamma * mixed.max(1).values"),
    ("target", "next actions sampled at s instead of s'",
     "a2 = torch.tanh(self.actor.sample(s2, cfg.num_target_samples))",
     "a2 = torch.tanh(self.actor.sample(s, cfg.num_target_samples))"),
    ("critic loss", "a mean over the K critics instead of their sum",
     "critic_loss = (q - y).pow(2).mean(1).sum()",
     "critic_loss = (q - y).pow(2).mean(1).mean()"),
    ("actor loss, warm-up", "the warm-up flag inverted",
     "if not warmup:  # a Python bool from the step counter",
     "if warmup:  # a Python bool from the step counter"),
    ("actor loss, warm-up", "the threshold epsilon left out of the actor's MMD term",
     "actor_loss = (alpha * (mmd_value - cfg.epsilon)).mean()",
     "actor_loss = (alpha * mmd_value).mean()"),
    ("actor loss, after warm-up", "no tanh before Q in the actor's term",
     "q_pi = self.critics(s, torch.tanh(u[:, -1]))",
     "q_pi = self.critics(s, u[:, -1])"),
    ("actor loss, after warm-up", "the actor's Q from the target critics",
     "q_pi = self.critics(s, torch.tanh(u[:, -1]))",
     "q_pi = self.target_critics(s, torch.tanh(u[:, -1]))"),
    ("actor loss, after warm-up", "the unbiased variance in the mean_var rule",
     "return q.mean(0) - var_penalty * q.var(0, unbiased=False)",
     "return q.mean(0) - var_penalty * q.var(0)"),
    ("MMD", "computed on the actor's tanh-squashed samples",
     "mmd_value = mmd(x, u[:, :-1], self.kernel, cfg.mmd_sigma)",
     "mmd_value = mmd(x, torch.tanh(u[:, :-1]), self.kernel, cfg.mmd_sigma)"),
    ("MMD", "the Q-term sample used in the MMD too (n + 1 samples)",
     "mmd_value = mmd(x, u[:, :-1], self.kernel, cfg.mmd_sigma)",
     "mmd_value = mmd(x, u, self.kernel, cfg.mmd_sigma)"),
    ("MMD", "the cross term without its factor 2",
     "- 2 * kernel(x, y, sigma).mean((1, 2))",
     "- kernel(x, y, sigma).mean((1, 2))"),
    ("MMD", "no square root",
     "return torch.sqrt(mmd2 + MMD_JITTER)",
     "return mmd2 + MMD_JITTER"),
    ("kernels", "the laplacian kernel on the L2 distance",
     "return torch.exp(-torch.cdist(x, y, p=1) / (2 * sigma))",
     "return torch.exp(-torch.cdist(x, y, p=2) / (2 * sigma))"),
    ("kernels", "the laplacian kernel with sigma squared",
     "return torch.exp(-torch.cdist(x, y, p=1) / (2 * sigma))",
     "return torch.exp(-torch.cdist(x, y, p=1) / (2 * sigma ** 2))"),
    ("kernels", "the gaussian kernel on the L2 distance, not squared",
     'return torch.exp(-torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2) / (2 * sigma))',
     'return torch.exp(-torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") / (2 * sigma))'),
    ("dual step", "the sign flipped (alpha shrinks while the MMD is above epsilon)",
     "return -(log_alpha.exp() * (mmd_value.detach().mean() - epsilon))",
     "return log_alpha.exp() * (mmd_value.detach().mean() - epsilon)"),
    ("dual step", "the log alpha clamp dropped",
     "self.log_alpha.clamp_(self.cfg.log_alpha_min, self.cfg.log_alpha_max)",
     "pass"),
    ("VAE loss", "the reconstruction without tanh",
     "recon = torch.tanh(self.decode_raw(s, z))  # [B, A]",
     "recon = self.decode_raw(s, z)  # [B, A]"),
    ("VAE loss", "the KL with log-std in place of 2 log-std",
     "kl = -0.5 * (1 + 2 * log_std - mean.pow(2) - std.pow(2)).mean()",
     "kl = -0.5 * (1 + log_std - mean.pow(2) - std.pow(2)).mean()"),
    ("VAE loss", "the KL weight ignored",
     "return F.mse_loss(recon, a) + kl_weight * kl",
     "return F.mse_loss(recon, a) + kl"),
    ("VAE prior", "the latent no longer clipped to +-0.5",
     ".clamp(-VAE_LATENT_CLIP, VAE_LATENT_CLIP)",
     ""),
    ("Polyak", "tau replaced by 1 - tau",
     "torch._foreach_lerp_(*self.polyak_pairs, cfg.tau)",
     "torch._foreach_lerp_(*self.polyak_pairs, 1 - cfg.tau)"),
    ("Polyak", "the online critics averaged towards the targets",
     "torch._foreach_lerp_(*self.polyak_pairs, cfg.tau)",
     "torch._foreach_lerp_(*self.polyak_pairs[::-1], cfg.tau)"),
    ("replay buffer", "rewards from other rows than the states",
     "return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.done[idx]",
     "return self.obs[idx], self.act[idx], self.rew[(idx + 1) % self.size], self.next_obs[idx], self.done[idx]"),
    ("replay buffer", "next states from other rows than the states",
     "return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.done[idx]",
     "return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[(idx + 1) % self.size], self.done[idx]"),
    ("replay buffer", "terminations from other rows than the states",
     "return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.done[idx]",
     "return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.done[(idx + 1) % self.size]"),
    ("actor", "the log-std clamp's upper end changed (2 to 5)",
     "ACTOR_LOG_STD_RANGE = (-20.0, 2.0)",
     "ACTOR_LOG_STD_RANGE = (-20.0, 5.0)"),
    ("actor", "the log-std clamp's lower end changed (-20 to -5)",
     "ACTOR_LOG_STD_RANGE = (-20.0, 2.0)",
     "ACTOR_LOG_STD_RANGE = (-5.0, 2.0)"),
    ("VAE loss", "the encoder's log-std clamp changed (-4 to -8)",
     "VAE_LOG_STD_RANGE = (-4.0, 15.0)",
     "VAE_LOG_STD_RANGE = (-8.0, 15.0)"),
    ("MMD", "the jitter under the square root changed (1e-6 to 1e-4)",
     "MMD_JITTER = 1e-6  # MMD = sqrt(MMD^2 + 1e-6)",
     "MMD_JITTER = 1e-4  # MMD = sqrt(MMD^2 + 1e-6)"),
    ("a new agent", "the target critics not copied from the critics (their own random start)",
     "self.target_critics.load_state_dict(self.critics.state_dict())",
     "pass"),
    ("evaluation", "every episode of an evaluation from one initial state",
     "self.seeds = [10_000 + 1_000 * cfg.seed + i for i in range(cfg.eval_episodes)]",
     "self.seeds = [10_000 + 1_000 * cfg.seed for i in range(cfg.eval_episodes)]"),
    ("regeneration recipe", "every chunk seed shifted by one",
     "return [(share if c < n - 1 else steps - share * c, REGEN_SEED_STRIDE * c, c < n - 1) for c in range(n)]",
     "return [(share if c < n - 1 else steps - share * c, REGEN_SEED_STRIDE * c + 1, c < n - 1) for c in range(n)]"),
]


def mutated(source: str, old: str, new: str) -> str | None:
    return source.replace(old, new) if source.count(old) == 1 else None


def run_fast_tests(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *FAST], cwd=folder,
                          capture_output=True, text=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the mutations and stop")
    p.add_argument("--start", type=int, default=1, help="begin at this mutation (1 = the first), to finish a run cut short")
    args = p.parse_args()
    source = (ROOT / "bear-train.py").read_text()
    if args.list:
        for area, mistake, _, _ in MUTATIONS:
            print(f"{area}: {mistake}")
        return 0
    print("| area | mistake | caught by | seconds |\n|---|---|---|---|", flush=True)
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        (folder / "bear-train.py").write_text(source)
        if run_fast_tests(folder).returncode != 0:
            print("the fast tests fail on the unmutated script: fix that first", file=sys.stderr)
            return 2
        for area, mistake, old, new in MUTATIONS[args.start - 1:]:
            text = mutated(source, old, new)
            if text is None:
                print(f"| {area} | {mistake} | STALE: the piece is not in the script once |  |", flush=True)
                missed += 1
                continue
            (folder / "bear-train.py").write_text(text)
            t = time.time()
            out = run_fast_tests(folder)
            failed = [line.split()[1] for line in out.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
            if out.returncode == 0:
                missed += 1
            verdict = failed[0].split("::")[-1].split("[")[0] if failed else "MISSED" if out.returncode == 0 else \
                f"exit {out.returncode}"
            print(f"| {area} | {mistake} | {verdict} | {time.time() - t:.0f} |", flush=True)
    tried = len(MUTATIONS) - args.start + 1
    print(f"\n{tried - missed} of {tried} caught" + (f" (mutations {args.start} to {len(MUTATIONS)})" if args.start > 1
                                                     else ""), flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
