"""AdaLoRA against hand computations: importance EMAs, triplet scores, the cubic schedule, masking,
the regulariser, and a real optimizer loop in which every allocation fits its scheduled budget."""

import logging

import numpy as np
import pytest
import torch

from adalora_cli.inject import find_targets, inject_adapters, mark_trainable
from adalora_cli.methods import get_method
from adalora_cli.methods.adalora import (
    AdaLoraAllocator,
    AdaLoraConfig,
    AdaLoraLinear,
    Schedule,
    orthogonality_regulariser,
    resolve_schedule,
)
from adalora_cli.methods.base import RankPlan
from conftest import tiny_model


def make_layer(d_in=3, d_out=2, rank=2, seed=0):
    torch.manual_seed(seed)
    return AdaLoraLinear(torch.nn.Linear(d_in, d_out), rank, scaling=1.0)


def allocator_for(layers, budget, total=10, unit="params", **cfg):
    config = AdaLoraConfig(**{"t_init": 0, "t_final": 0, "delta_t": 1, **cfg})
    plan = RankPlan({n: l.lora_E.shape[0] for n, l in layers.items()}, budget, budget, {"unit": unit})
    return AdaLoraAllocator(layers, config, plan, total)


def set_values(layer, values, grads):
    with torch.no_grad():
        for name in ("lora_A", "lora_E", "lora_B"):
            getattr(layer, name).copy_(torch.tensor(values[name], dtype=torch.float32))
            getattr(layer, name).grad = torch.tensor(grads[name], dtype=torch.float32)


def random_like(layer, rng):
    return {n: rng.normal(size=tuple(getattr(layer, n).shape)) for n in ("lora_A", "lora_E", "lora_B")}


def test_importance_emas_match_hand_computation():
    layer = make_layer()
    allocator = allocator_for({"m": layer}, budget=10)
    rng = np.random.default_rng(0)
    b1 = b2 = 0.85
    ipt = {n: 0.0 for n in ("lora_A", "lora_E", "lora_B")}
    unc = dict(ipt)
    for _ in range(3):
        values, grads = random_like(layer, rng), random_like(layer, rng)
        set_values(layer, values, grads)
        allocator.update_importance()
        for n in ipt:
            sensitivity = np.abs(values[n] * grads[n])
            ipt[n] = b1 * ipt[n] + (1 - b1) * sensitivity
            unc[n] = b2 * unc[n] + (1 - b2) * np.abs(sensitivity - ipt[n])
    for i, n in enumerate(("lora_B", "lora_E", "lora_A")):  # the allocator's order: P, lambda, Q
        np.testing.assert_allclose(allocator.ipt[i].numpy(), ipt[n], rtol=1e-5)
        np.testing.assert_allclose(allocator.unc[i].numpy(), unc[n], rtol=1e-5)

    s = {n: ipt[n] * unc[n] for n in ipt}
    expected = [s["lora_E"][i, 0] + s["lora_B"][:, i].mean() + s["lora_A"][i, :].mean() for i in range(2)]
    np.testing.assert_allclose(allocator.triplet_scores().numpy(), expected, rtol=1e-5)


def test_cubic_schedule_by_hand():
    schedule = Schedule(total=20, t_init=4, t_final=6, delta_t=3)  # decay steps t=4..13, D=10
    b0, bT = 1000, 400
    expected = {
        0: (1000, False), 3: (1000, False),
        4: (400 + int(600 * 0.9**3), False),  # k=1
        6: (400 + int(600 * 0.7**3), True),  # k=3: every delta_t decay steps
        8: (400 + int(600 * 0.5**3), False),  # k=5: 475
        9: (400 + int(600 * 0.4**3), True),  # k=6
        13: (400, True),  # k=D: the decay always ends on an allocation at bT
        14: (400, True), 19: (400, True),  # final phase: every step
    }
    for t, value in expected.items():
        assert schedule.budget(t, b0, bT) == value, t
    assert [schedule.phase(t) for t in (3, 4, 13, 14)] == ["warmup", "decay", "decay", "final"]


def test_schedule_longer_than_the_run_is_rescaled_with_a_warning(caplog):
    cfg = AdaLoraConfig(t_init=8000, t_final=50000, delta_t=100)
    with caplog.at_level(logging.WARNING):
        schedule = resolve_schedule(cfg, 300)
    assert "rescaled" in caplog.text and "t_init=8000" in caplog.text
    factor = 0.65 * 300 / 58000
    assert (schedule.t_init, schedule.t_final, schedule.delta_t) == (round(8000 * factor), round(50000 * factor), 1)
    assert schedule.decay_steps > 0
    fitting = resolve_schedule(AdaLoraConfig(t_init=30, t_final=120, delta_t=10), 300)
    assert (fitting.t_init, fitting.t_final, fitting.delta_t) == (30, 120, 10)
    fractions = resolve_schedule(AdaLoraConfig(t_init=0.1, t_final=0.4, delta_t=0.01), 300)
    assert (fractions.t_init, fractions.t_final, fractions.delta_t) == (30, 120, 3)


def test_mask_keeps_the_best_prefix_that_fits_and_never_overprunes_ties():
    small, large = make_layer(3, 2, rank=3), make_layer(10, 6, rank=3, seed=1)  # triplet costs 6 and 17
    allocator = allocator_for({"small": small, "large": large}, budget=30)
    # Equal scores everywhere (no importance yet): a threshold rule would prune all; we keep what fits.
    keep = allocator.keep_mask(30)
    assert keep.tolist() == [True, True, True, False, False, False]  # 3 x 6 = 18; + 17 = 35 > 30
    with torch.no_grad():
        for t in allocator.ipt + allocator.unc:
            t.fill_(1.0)
        allocator.unc[4][1] = 5.0  # raise lambda_1 of the large layer to the top
    keep = allocator.keep_mask(30)
    # Ranking: large#1 (score 7), then the ties at score 3 in index order: small#0, small#1, small#2, ...
    # Costs 17 + 6 + 6 = 29 fit in 30; adding small#2 (35) would not.
    assert keep.tolist() == [True, True, False, False, True, False]


def test_every_allocation_fits_its_budget_and_the_best_pruned_triplet_would_not():
    torch.manual_seed(0)
    model = tiny_model("bert")
    method, cfg = get_method("adalora"), AdaLoraConfig(t_init=3, t_final=5, delta_t=2, orth_reg=0.1)
    targets = find_targets(model, "bert")
    plan = method.plan(targets, 3 * sum(t.d_in + t.d_out + 1 for t in targets), cfg)  # init_r 5 (1.5 x 3)
    layers = inject_adapters(model, method, cfg, plan)
    mark_trainable(model, method, {n for n, _ in model.named_parameters() if n.startswith("classifier")})
    allocator = method.make_allocator(layers, cfg, plan, 20)
    regulariser = orthogonality_regulariser(list(layers.values()), cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = torch.randint(5, 1000, (8, 12)), torch.randint(0, 2, (8,))
    kept_in_final = None
    for t in range(20):
        loss = model(input_ids=ids, labels=labels).loss + regulariser()
        loss.backward()
        optimizer.step()
        allocator.after_optimizer_step(t)
        budget, pruned = allocator.schedule.budget(t, allocator.b0, allocator.bT)
        if pruned:
            kept = torch.cat([layer.kept for layer in layers.values()])
            lambdas = torch.cat([layer.lora_E.detach().view(-1) for layer in layers.values()])
            assert (lambdas[~kept] == 0).all()
            cost = int(allocator.unit_costs[kept].sum())
            assert cost <= budget == allocator.budget
            assert cost == allocator.kept_params()
            if allocator.schedule.phase(t) != "final":
                scores = allocator.triplet_scores()
                best_pruned = int(torch.argmax(torch.where(kept, -torch.inf, scores)))
                assert cost + int(allocator.unit_costs[best_pruned]) > budget
            else:
                kept_in_final = kept if kept_in_final is None else kept_in_final
                assert torch.equal(kept, kept_in_final)  # the final phase freezes the rank pattern
        optimizer.zero_grad()
    allocator.finalize()
    ranks = [layer.rank for layer in layers.values()]
    assert sum(r * (l.in_features + l.out_features + 1) for r, l in zip(ranks, layers.values())) <= plan.budget
    assert len(set(ranks)) > 1  # the budget went unevenly
    layer = next(iter(layers.values()))
    assert {k: tuple(v.shape) for k, v in layer.compact_state().items()} == {
        "lora_A": (layer.rank, 32), "lora_E": (layer.rank, 1), "lora_B": (32, layer.rank)}


def test_orthogonality_regulariser_by_hand():
    layers = [make_layer(5, 4, rank=3, seed=s) for s in range(2)]
    value = orthogonality_regulariser(layers, AdaLoraConfig(orth_reg=0.3))()
    expected = 0.0
    for layer in layers:
        A, B = layer.lora_A.detach().numpy(), layer.lora_B.detach().numpy()
        expected += np.linalg.norm(A @ A.T - np.eye(3)) + np.linalg.norm(B.T @ B - np.eye(3))
    assert value.item() == pytest.approx(0.3 * expected / 4, rel=1e-5)
    assert orthogonality_regulariser(layers, AdaLoraConfig(orth_reg=0.0)) is None


def test_orthogonality_gradient_equals_autograd_of_the_formula():
    """The regulariser computes its own gradient (group by group, see `_GramPenalty`): it equals autograd's on the
    plain formula, for factors of several shapes."""
    layers = [make_layer(5, 4, rank=3, seed=0), make_layer(5, 4, rank=3, seed=1), make_layer(7, 6, rank=2, seed=2)]
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    orthogonality_regulariser(layers, AdaLoraConfig(orth_reg=0.3))().backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    reference = sum(torch.linalg.matrix_norm(l.lora_A @ l.lora_A.T - torch.eye(l.lora_A.shape[0]))
                    + torch.linalg.matrix_norm(l.lora_B.T @ l.lora_B - torch.eye(l.lora_B.shape[1])) for l in layers)
    (0.3 * reference / 6).backward()
    for mine, p in zip(ours, params):
        torch.testing.assert_close(mine, p.grad, rtol=1e-5, atol=1e-7)
