"""Does d3rlpy 2.8.1's BEAR actor step see the MMD constraint after warm-up? Run with the d3rlpy venv's python:

    .venv-d3rlpy/bin/python benchmarks/d3rlpy_actor_gradient.py

d3rlpy's compute_actor_grad zeroes the actor's gradients, then builds the actor loss (Q term + alpha (MMD - eps));
building it calls update_alpha, which backpropagates -alpha (MMD - eps) with retain_graph, through the policy as
well as log alpha, into the same gradient buffers; then the actor loss is backpropagated. This script takes one
such step (the configuration of speed.py) and compares the actor's gradient with the gradients of the Q term alone
and of the full loss, recomputed from the same random draws."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

from d3rlpy.torch_utility import TorchMiniBatch  # noqa: E402


def main():
    run = speed.d3rlpy_stepper(argparse.Namespace(threads=2, k=2, batch=256, warmup=0, device="cpu"))
    impl, batch = run.algo.impl, run.batch
    batch = TorchMiniBatch.from_batch(batch, gamma=0.99, compute_returns_to_go=False, device="cpu:0")
    params = list(impl._modules.policy.parameters())

    def gradient(terms):
        """The actor's gradient of the chosen loss terms, from the draws of seed 0."""
        torch.manual_seed(0)
        loss = impl.compute_actor_loss(batch, impl._modules.policy(batch.observations))
        for p in params:
            p.grad = None  # drop what update_alpha put there
        torch.autograd.backward(terms(loss), inputs=params)
        return [p.grad.clone() for p in params]

    torch.manual_seed(0)
    impl.compute_actor_grad(batch)  # d3rlpy's own actor step, before its optimiser step
    d3rlpy_grad = [p.grad.clone() for p in params]
    q_only = gradient(lambda loss: loss.actor_loss - loss.mmd_loss)
    full = gradient(lambda loss: loss.actor_loss)

    def dist(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    print(f"max |d3rlpy actor gradient - gradient of the Q term alone|: {dist(d3rlpy_grad, q_only):.2e}")
    print(f"max |d3rlpy actor gradient - gradient of Q term + alpha (MMD - eps)|: {dist(d3rlpy_grad, full):.2e}")
    print(f"max |the MMD term's own contribution|: {dist(full, q_only):.2e}")


if __name__ == "__main__":
    main()
