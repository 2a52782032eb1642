"""PRILoRA: the rank plan rises with depth and fits the budget; the input-norm EMA matches a hand computation;
every prune leaves each row of A with exactly the intended number of non-zeros."""

import numpy as np
import pytest
import torch

from adalora_cli.budget import Target
from adalora_cli.errors import UserError
from adalora_cli.methods.prilora import InputNormPruner, PriLoraConfig, PriLoraLinear, linear_ranks, plan_increasing


def deberta_like_targets(layers=12, hidden=768, ffn=3072):
    shapes = {"Wq": (hidden, hidden), "Wk": (hidden, hidden), "Wv": (hidden, hidden), "Wo": (hidden, hidden),
              "Wf1": (hidden, ffn), "Wf2": (ffn, hidden)}
    return [Target(f"l{l}.{k}", d_in, d_out, l, k) for l in range(layers) for k, (d_in, d_out) in shapes.items()]


def test_paper_plan_without_budget_is_4_to_12():
    assert linear_ranks(list(range(12)), 4, 12) == {l: round(4 + 8 * l / 11) for l in range(12)}
    plan = plan_increasing(deberta_like_targets(), None, PriLoraConfig())
    assert plan.ranks["l0.Wq"] == 4 and plan.ranks["l11.Wf2"] == 12


@pytest.mark.parametrize("budget", [200_000, 300_000, 1_000_000, 1_330_000])
def test_plan_never_decreases_with_depth_and_fits_the_budget(budget):
    targets = deberta_like_targets()
    plan = plan_increasing(targets, budget, PriLoraConfig())
    by_layer = [plan.ranks[f"l{l}.Wq"] for l in range(12)]
    assert by_layer == sorted(by_layer) and by_layer[-1] > by_layer[0]
    cost = sum(plan.ranks[t.name] * (t.d_in + t.d_out) for t in targets)
    assert cost <= budget
    bigger = plan_increasing(targets, None, PriLoraConfig(r_first=4 * plan.notes["scale"] * 1.02,
                                                          r_last=12 * plan.notes["scale"] * 1.02))
    assert sum(bigger.ranks[t.name] * (t.d_in + t.d_out) for t in targets) >= cost  # nothing much left unused


def test_budget_below_one_rank_per_target():
    with pytest.raises(UserError, match="below one rank per adapted matrix"):
        plan_increasing(deberta_like_targets(), 100_000, PriLoraConfig())


def make_pruner(ratio=0.25, interval=2, beta=0.9, d_in=8, rank=3):
    torch.manual_seed(0)
    layer = PriLoraLinear(torch.nn.Linear(d_in, 5), rank, scaling=1.0).train()
    cfg = PriLoraConfig(prune_ratio=ratio, prune_interval=interval, beta=beta)
    return layer, InputNormPruner({"m": layer}, cfg, None, 10)


def test_input_norm_ema_matches_hand_computation():
    layer, pruner = make_pruner(beta=0.9)
    rng = np.random.default_rng(0)
    expected = np.zeros(8)
    for t in range(3):
        micro_batches = [rng.normal(size=(2, 4, 8)) for _ in range(2)]  # two micro-batches per optimizer step
        for x in micro_batches:
            layer(torch.tensor(x, dtype=torch.float32))
        tokens = np.concatenate([x.reshape(-1, 8) for x in micro_batches])
        expected = 0.9 * expected + 0.1 * np.sqrt((tokens ** 2).sum(axis=0))
        pruner.after_optimizer_step(t)
        np.testing.assert_allclose(layer.input_norm.numpy(), expected, rtol=1e-5)
    with torch.no_grad():
        layer(torch.ones(3, 8))  # no statistics outside training steps with gradients
    layer.eval()
    layer(torch.ones(3, 8))
    assert torch.count_nonzero(layer.input_sq_sum) == 0


@pytest.mark.parametrize("ratio, kept", [(0.25, 6), (0.5, 4), (0.3, 6), (0.0, 8)])
def test_prune_keeps_exactly_the_intended_non_zeros_per_row(ratio, kept):
    layer, pruner = make_pruner(ratio=ratio)
    layer(torch.randn(4, 8) * torch.arange(1, 9))
    pruner.update_statistics()
    A_before = layer.lora_A.detach().clone()
    pruner.prune()
    A = layer.lora_A.detach()
    assert (torch.count_nonzero(A, dim=1) == kept).all()
    score = A_before.abs() * layer.input_norm
    for row in range(A.shape[0]):
        survivors = set(torch.nonzero(A[row]).view(-1).tolist())
        assert survivors == set(torch.topk(score[row], kept).indices.tolist())


def test_prune_schedule_counts_optimizer_steps():
    layer, pruner = make_pruner(interval=3)
    for t in range(7):
        layer(torch.randn(2, 8))
        pruner.after_optimizer_step(t)
    assert pruner.prunes == 2  # after steps 2 and 5 (0-based)
