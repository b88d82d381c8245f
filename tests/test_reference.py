"""MISA(backend="torch") against a line-by-line reference of Algorithm 1 in float64.

The reference below is written from the paper (Alg. 1, Alg. 2, eq. 4, App. A.2) plus the
documented choices of the library (scores divided by their mean, logit cap, EMA debiasing,
start-up sweep). It shares no code with the library; it consumes the sampling generator
with the same calls so that both draw the same modules.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import misa_kernels as mk
from conftest import random_batch, tiny_llama

MODULE_NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def reference_units(model, granularity):
    layers = model.model.layers
    modules = [[(f"model.layers.{i}.{n}", layers[i].get_submodule(n).weight)] for i in range(len(layers))
               for n in MODULE_NAMES]
    if granularity == "module":
        return modules
    per_layer = len(MODULE_NAMES)
    return [sum(modules[i * per_layer:(i + 1) * per_layer], []) for i in range(len(layers))]


def reference_probabilities(G, observations, beta, eta, cap):
    B = len(G)
    scored = [b for b in range(B) if observations[b] > 0]
    if not scored:
        return torch.full((B,), 1.0 / B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    s = torch.zeros(B, dtype=torch.float64)
    for b in scored:
        s[b] = G[b] / (1 - beta ** observations[b])
    prior = sum(s[b] for b in scored) / len(scored)
    for b in range(B):
        if observations[b] == 0:
            s[b] = prior
    mean = s.mean()
    if eta == 0 or mean <= 0:
        return torch.full((B,), 1.0 / B, dtype=torch.float64), s
    logits = torch.tensor([min(eta * float(x) / float(mean), cap) for x in s], dtype=torch.float64)
    weights = torch.exp(logits - logits.max())
    return weights / weights.sum(), s


def reference_misa(model, batches, *, lr, delta, eta, T, betas, eps, weight_decay, beta, strategy,
                   granularity, seed, sweep, cap=5.0, momentum="beta1"):
    """Algorithm 1 (with Algorithm 2 for line 5), one loop iteration per line of the paper."""
    b1, b2 = betas
    units = reference_units(model, granularity)  # line 1
    B = len(units)
    n_model = sum(p.numel() for p in model.parameters())
    sizes = [sum(w.numel() for _, w in u) for u in units]
    p = torch.full((B,), 1.0 / B, dtype=torch.float64)  # line 2
    G = [0.0] * B  # line 3
    observations = [0] * B
    counts = [0] * B
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    history = []
    batch_iter = iter(batches)
    while True:
        # line 5 / Algorithm 2
        if sweep and 0 in counts:
            never = [b for b in range(B) if counts[b] == 0]
            order = [never[i] for i in torch.randperm(len(never), generator=gen).tolist()]
            inner = 1
        else:
            if strategy in ("misa", "uniform"):
                order = torch.multinomial(p, B, replacement=False, generator=gen).tolist()
            else:
                _, s = reference_probabilities(G, observations, beta, eta, cap)
                shuffle = torch.randperm(B, generator=gen)
                ranked = torch.sort(s[shuffle], descending=strategy == "topk", stable=True).indices
                order = shuffle[ranked].tolist()
            inner = T
        active, used = [], 0
        for b in order:
            if used + sizes[b] <= delta * n_model:
                active.append(b)
                used += sizes[b]
        if not active:
            active = order[:1]
        history.append(sorted(active))
        for b in active:
            counts[b] += 1
        params = [w for b in active for _, w in units[b]]
        for w in params:
            w.requires_grad_(True)
        m = {w: torch.zeros_like(w) for w in params}  # line 6
        v = {w: torch.zeros_like(w) for w in params}
        sq_sum = [0.0] * B
        for t in range(1, inner + 1):  # line 7
            batch = next(batch_iter, None)
            if batch is None:
                return history
            loss = model(**batch).loss  # line 8
            loss.backward()
            with torch.no_grad():
                for b in active:
                    sq_sum[b] += sum(float(w.grad.pow(2).sum()) for _, w in units[b]) / sizes[b]
                for w in params:
                    g = w.grad
                    m[w] = b1 * m[w] + (1 - b1) * g  # line 10
                    v[w] = b2 * v[w] + (1 - b2) * g * g
                    m_hat = m[w] / (1 - b1**t)
                    v_hat = v[w] / (1 - b2**t)
                    w -= lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * w)  # line 12 (AdamW)
                    w.grad = None
        with torch.no_grad():
            for b in active:  # line 14, eq. 4
                G[b] = beta * G[b] + (1 - beta) * sq_sum[b] / inner
                observations[b] += 1
            p, _ = reference_probabilities(G, observations, beta, 0.0 if strategy == "uniform" else eta, cap)
            c = dict(beta1=b1, proof=b1 / (1 - b1), none=0.0)[momentum]  # the proof: x = theta - a b1/(1-b1) m/...
            for w in params:  # line 16
                m_hat = m[w] / (1 - b1**inner)
                v_hat = v[w] / (1 - b2**inner)
                w -= lr * c * m_hat / (v_hat.sqrt() + eps)
                w.requires_grad_(False)  # line 17
    return history


def run_library(model, batches, *, lr, delta, eta, T, betas, eps, weight_decay, beta, strategy,
                granularity, seed, sweep, momentum=None):
    opt = mk.MISA(model, lr=lr, delta=delta, eta=eta, inner_steps=T, betas=betas, eps=eps,
                  weight_decay=weight_decay, score_beta=beta, strategy=strategy, granularity=granularity,
                  seed=seed, backend="torch", sweep=sweep, momentum_step=momentum)
    history = []
    names = [u.name for u in opt.units]
    for batch in batches:
        if opt.inner_step == 0:
            history.append(sorted(names.index(n) for n in {u.name for u in opt.units
                                                            if set(u.module_names) <= set(opt.active_modules)}))
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return history


@pytest.mark.parametrize("strategy", ["misa", "uniform", "topk", "bottomk"])
@pytest.mark.parametrize("sweep", [False, True])
def test_matches_algorithm_1(strategy, sweep):
    model = tiny_llama(layers=2).double()
    batches = [random_batch(batch=2, seq=12, seed=i) for i in range(40)]
    kwargs = dict(lr=3e-3, delta=0.12, eta=1.0, T=3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01,
                  beta=0.9, strategy=strategy, granularity="module", seed=7, sweep=sweep)
    expected_model = copy.deepcopy(model)
    expected_history = reference_misa(expected_model, batches, **kwargs)
    history = run_library(model, batches, **kwargs)

    assert history == expected_history[: len(history)]
    assert len(history) >= 8  # several switches happened
    for (name, got), want in zip(model.named_parameters(), expected_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_llama(layers=2).double().parameters()))


@pytest.mark.parametrize("momentum", ["beta1", "proof", "none"])
def test_momentum_step_forms(momentum):
    """The extra step of line 16 with c = beta1, the proof's beta1 / (1 - beta1), or none."""
    model = tiny_llama(layers=2).double()
    batches = [random_batch(batch=2, seq=12, seed=i) for i in range(12)]
    kwargs = dict(lr=3e-3, delta=0.12, eta=1.0, T=3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                  beta=0.9, strategy="misa", granularity="module", seed=5, sweep=False, momentum=momentum)
    expected_model = copy.deepcopy(model)
    reference_misa(expected_model, batches, **kwargs)
    run_library(model, batches, **kwargs)
    for got, want in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["misa", "uniform", "topk", "bottomk"])
def test_default_sweep_only_for_importance_sampling(strategy):
    """Paper C.4's ablations sample from the first draw (Top-K leaves many modules never
    sampled); only MISA's importance sampling starts with the sweep by default."""
    model = tiny_llama(layers=2).double()
    batches = [random_batch(batch=2, seq=12, seed=i) for i in range(30)]
    kwargs = dict(lr=3e-3, delta=0.12, eta=1.0, T=3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                  beta=0.9, strategy=strategy, granularity="module", seed=11)
    expected_history = reference_misa(copy.deepcopy(model), batches, sweep=strategy == "misa", **kwargs)
    history = run_library(model, batches, sweep=None, **kwargs)
    assert history == expected_history[: len(history)] and len(history) >= 8


def test_matches_algorithm_1_layerwise():
    model = tiny_llama(layers=3).double()
    batches = [random_batch(batch=2, seq=12, seed=i) for i in range(24)]
    kwargs = dict(lr=3e-3, delta=0.3, eta=1.0, T=4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  beta=0.9, strategy="misa", granularity="layer", seed=3, sweep=True)
    expected_model = copy.deepcopy(model)
    expected_history = reference_misa(expected_model, batches, **kwargs)
    history = run_library(model, batches, **kwargs)
    assert history == expected_history[: len(history)]
    for got, want in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_probability_helper_is_softmax():
    # The reference's probabilities are the closed form of Prop. 1 on normalised scores.
    p, _ = reference_probabilities([0.1, 0.3], [1, 1], beta=0.5, eta=1.0, cap=5.0)
    s = torch.tensor([0.2, 0.6], dtype=torch.float64)
    expected = torch.softmax(s / s.mean(), 0)
    torch.testing.assert_close(p, expected)
    assert math.isclose(float(p.sum()), 1.0)
