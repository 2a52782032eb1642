"""Every registered method on every preset architecture: targets, exact parameter counts, and an adapted
model that starts out equal to the base model. New methods are covered by the registry parametrisation."""

import copy

import pytest
import torch

from adalora_cli.errors import UserError
from adalora_cli.inject import ENCODER_KINDS, find_targets, inject_adapters, mark_trainable
from adalora_cli.methods import available_methods, get_method
from conftest import tiny_model

ARCHITECTURES = ["bert", "roberta", "deberta-v2"]
ADAPTER_METHODS = [m for m in available_methods() if get_method(m).adapter]
HEAD_PREFIXES = ("classifier", "pooler")


def head_names(model):
    return {n for n, _ in model.named_parameters() if n.split(".")[0] in HEAD_PREFIXES and
            not (n.startswith("pooler") and model.config.model_type != "deberta-v2")}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_presets_find_the_six_matrices_of_every_layer(arch):
    model = tiny_model(arch)
    targets = find_targets(model, model.config.model_type)
    assert len(targets) == 6 * model.config.num_hidden_layers
    for layer in range(model.config.num_hidden_layers):
        assert sorted(t.kind for t in targets if t.layer == layer) == sorted(ENCODER_KINDS)
    shapes = {t.kind: (t.d_in, t.d_out) for t in targets}
    assert shapes == {"Wq": (32, 32), "Wk": (32, 32), "Wv": (32, 32), "Wo": (32, 32), "Wf1": (32, 64), "Wf2": (64, 32)}
    assert not any("attention" in t.name for t in targets if t.kind == "Wf2")


def test_unknown_architecture_needs_explicit_targets():
    model = tiny_model("bert")
    with pytest.raises(UserError, match="no target preset"):
        find_targets(model, "gpt_neox")
    assert len(find_targets(model, "gpt_neox", ["query", "value"])) == 4
    with pytest.raises(UserError, match="no linear layer"):
        find_targets(model, "bert", ["nothing_matches"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_adapter_starts_equal_to_base_and_counts_parameters_exactly(arch, name):
    method = get_method(name)
    cfg = method.config_cls()
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    targets = find_targets(model, model.config.model_type)
    per_rank = sum(t.d_in + t.d_out for t in targets)  # 2 layers x (4 x 64 + 2 x 96) = 896
    assert per_rank == 896
    plan = method.plan(targets, 4 * per_rank + 200, cfg)
    layers = inject_adapters(model, method, cfg, plan)
    assert sorted(layers) == sorted(t.name for t in targets)
    head = head_names(model)
    trainable, total = mark_trainable(model, method, head)
    adapter = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    head_count = sum(p.numel() for n, p in model.named_parameters() if n in head)
    expected_adapter = sum(rank * (t.d_in + t.d_out + layers[t.name].component_extra)
                           for t, rank in ((t, plan.ranks[t.name]) for t in targets))
    assert adapter == expected_adapter == sum(layer.param_count() for layer in layers.values())
    assert trainable == adapter + head_count
    assert total == sum(p.numel() for p in base.parameters()) + adapter

    ids = torch.randint(5, 1000, (3, 11))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_to_lora_reproduces_the_layer(name):
    method = get_method(name)
    cfg = method.config_cls()
    layer = method.make_layer(torch.nn.Linear(12, 7), 5, method.initial_scaling(5, cfg), cfg)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(4, 12)
    factors = layer.to_lora()
    expected = layer.base(x) + x @ factors.delta_weight().T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert factors.rank == layer.rank


def test_full_fine_tuning_trains_everything():
    model = tiny_model("bert")
    trainable, total = mark_trainable(model, get_method("full"), set())
    assert trainable == total
