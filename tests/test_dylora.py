"""DyLoRA: truncation equals LoRA built from the first b components; the default (non-frozen) mode trains every
component 1..b and frozen mode only component b; the rank draws stay within [r_min, r_max] and resume exactly."""

import pytest
import torch

from adalora_cli.budget import Target
from adalora_cli.errors import UserError
from adalora_cli.methods.dylora import DyLoraConfig, DyLoraLinear, RankSampler, plan_nested
from adalora_cli.methods.lora import LoraLinear


def trained_layer(r_max=6, mode="nonfrozen", seed=0):
    torch.manual_seed(seed)
    layer = DyLoraLinear(torch.nn.Linear(10, 7), r_max, alpha=16.0, mode=mode)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("b", [1, 3, 6])
def test_rank_b_equals_lora_from_the_first_b_components(b):
    layer = trained_layer().eval()
    layer.set_rank(b)
    lora = LoraLinear(layer.base, b, scaling=16.0 / b)
    with torch.no_grad():
        lora.lora_A.copy_(layer.lora_A[:b])
        lora.lora_B.copy_(layer.lora_B[:, :b])
    x = torch.randn(4, 5, 10)
    assert torch.allclose(layer(x), lora(x), atol=1e-6)
    factors = layer.to_lora()
    assert factors.rank == b and factors.scale == pytest.approx(16.0 / b)


def test_frozen_mode_changes_only_component_b():
    layer = trained_layer(mode="frozen").train()
    layer.set_rank(4)
    before_A, before_B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1, weight_decay=0.0)
    layer(torch.randn(8, 10)).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad[[0, 1, 2, 4, 5]]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[3]) > 0
    optimizer.step()
    changed_rows = (layer.lora_A.detach() != before_A).any(dim=1).nonzero().view(-1).tolist()
    changed_cols = (layer.lora_B.detach() != before_B).any(dim=0).nonzero().view(-1).tolist()
    assert changed_rows == [3] and changed_cols == [3]


def test_the_default_mode_trains_every_component_up_to_b():
    """The paper's headline mode (non-frozen, Table 2): at a step drawn at rank b, gradients reach components
    1..b of both A and B, and nothing beyond b."""
    assert DyLoraConfig().mode == "nonfrozen"
    layer = trained_layer(mode=DyLoraConfig().mode).train()
    layer.set_rank(4)
    layer(torch.randn(8, 10)).pow(2).sum().backward()
    assert (layer.lora_A.grad[:4].abs().sum(dim=1) > 0).all()
    assert (layer.lora_B.grad[:, :4].abs().sum(dim=0) > 0).all()
    assert torch.count_nonzero(layer.lora_A.grad[4:]) == 0 and torch.count_nonzero(layer.lora_B.grad[:, 4:]) == 0


def test_the_earlier_mode_name_is_still_accepted(caplog):
    cfg = DyLoraConfig(mode="full")
    with caplog.at_level("WARNING", logger="adalora_cli"):
        cfg.validate()
    assert cfg.mode == "nonfrozen"
    with pytest.raises(UserError, match="dylora.mode must be one of nonfrozen, frozen"):
        DyLoraConfig(mode="all").validate()


def test_sampler_draws_in_range_identically_and_resumes():
    targets = [Target("m", 10, 7, 0, "Wq")]
    cfg = DyLoraConfig(r_min=2, seed=7)
    plan = plan_nested(targets, 17 * 5, cfg)  # budget for r_max 5
    assert plan.notes["r_max"] == 5
    first = RankSampler({"m": trained_layer(5)}, cfg, plan, 100)
    second = RankSampler({"m": trained_layer(5)}, cfg, plan, 100)
    for t in range(50):
        first.step(t)
        second.step(t)
    assert first.draws == second.draws and set(first.draws) <= {2, 3, 4, 5} and len(set(first.draws)) == 4
    state = first.state_dict()
    resumed = RankSampler({"m": trained_layer(5)}, cfg, plan, 100)
    resumed.load_state_dict(state)
    for t in range(50, 60):
        first.step(t)
        resumed.step(t)
    assert resumed.draws == first.draws
    layer = first.layers[0]
    first.finalize()
    assert layer.active_rank == 5


def test_rank_outside_range_and_plan_errors():
    layer = trained_layer(4)
    with pytest.raises(UserError, match="outside 1..4"):
        layer.set_rank(5)
    targets = [Target("m", 10, 7, 0, "Wq")]
    with pytest.raises(UserError, match="does not fit"):
        plan_nested(targets, 17 * 3, DyLoraConfig(r_max=4))
