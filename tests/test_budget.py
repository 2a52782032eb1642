"""Budget parsing and the parameter accounting of every rank plan."""

import pytest

from adalora_cli.budget import Target, largest_uniform_rank, parse_budget
from adalora_cli.errors import UserError
from adalora_cli.methods.adalora import AdaLoraConfig, plan_adaptive
from adalora_cli.methods.lora import LoraConfig, plan_uniform


@pytest.mark.parametrize("text, expected", [
    ("300000", 300_000), (300000, 300_000), ("300k", 300_000), ("300K", 300_000), ("0.3M", 300_000),
    ("1.27M", 1_270_000), (".5m", 500_000), ("12", 12), ("1e3", None),
])
def test_parse_budget(text, expected):
    if expected is None:
        with pytest.raises(UserError):
            parse_budget(text)
    else:
        assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["0.3X", "-5", "0", "", "abc", "0k", "3 M M", True])
def test_parse_budget_rejects(bad):
    with pytest.raises(UserError, match="budget"):
        parse_budget(bad)


def minilm_targets():
    """The 36 targets of MiniLM-L6 (hidden 384, FFN 1536): 4 square 384x384 and 2 FFN matrices per layer."""
    shapes = {"Wq": (384, 384), "Wk": (384, 384), "Wv": (384, 384), "Wo": (384, 384),
              "Wf1": (384, 1536), "Wf2": (1536, 384)}
    return [Target(f"l{layer}.{kind}", d_in, d_out, layer, kind)
            for layer in range(6) for kind, (d_in, d_out) in shapes.items()]


def test_lora_plan_is_largest_uniform_rank_within_budget():
    targets = minilm_targets()
    per_rank = 6 * (4 * 768 + 2 * 1920)  # 41,472 parameters per rank across the 36 matrices
    plan = plan_uniform(targets, 300_000, LoraConfig())
    assert set(plan.ranks.values()) == {7}
    assert 7 * per_rank == 290_304 <= 300_000 < 8 * per_rank
    assert plan_uniform(targets, None, LoraConfig(r=4)).ranks[targets[0].name] == 4


def test_budget_below_one_rank_per_target_fails():
    with pytest.raises(UserError, match="below one rank per adapted matrix"):
        largest_uniform_rank(minilm_targets(), 41_471)
    with pytest.raises(UserError, match="below one rank per adapted matrix"):
        plan_adaptive(minilm_targets(), 41_000, AdaLoraConfig())


def test_adalora_plan_starts_at_one_and_a_half_times_the_final_average_rank():
    plan = plan_adaptive(minilm_targets(), 300_000, AdaLoraConfig())
    per_rank = 6 * (4 * 769 + 2 * 1921)  # each triplet also holds its lambda
    assert plan.notes["target_avg_rank"] == round(300_000 / per_rank, 3)  # 7.228
    assert set(plan.ranks.values()) == {11}  # round(1.5 * 7.228)
    assert plan.allocator_budget == 300_000 and plan.notes["unit"] == "params"


def test_adalora_budget_above_initial_ranks_fails():
    with pytest.raises(UserError, match="above what the initial rank holds"):
        plan_adaptive(minilm_targets(), 300_000, AdaLoraConfig(init_r=2))


def test_adalora_paper_knobs_count_triplets():
    plan = plan_adaptive(minilm_targets(), None, AdaLoraConfig(init_r=3, target_r=2))
    assert set(plan.ranks.values()) == {3}
    assert plan.allocator_budget == 72 and plan.notes["unit"] == "triplets"
    with pytest.raises(UserError, match="either --budget or adalora.target_r"):
        plan_adaptive(minilm_targets(), 300_000, AdaLoraConfig(target_r=2))


# -- a budget above what the adapted matrices can hold ---------------------------------------------------------

def full_rank_cost(targets, extra: int) -> int:
    """Every target at rank min(d_in, d_out), each rank-1 component costing d_in + d_out (+ extra)."""
    return sum(min(t.d_in, t.d_out) * (t.d_in + t.d_out + extra) for t in targets)


@pytest.mark.parametrize("method", ["lora", "adalora", "prilora", "dylora"])
def test_a_budget_above_full_rank_is_refused_with_the_maximum(method):
    from adalora_cli.methods import get_method

    record, targets = get_method(method), minilm_targets()
    most = full_rank_cost(targets, 1 if method == "adalora" else 0)
    assert most == 384 * 6 * (4 * (768 + (method == "adalora")) + 2 * (1920 + (method == "adalora")))
    with pytest.raises(UserError, match=f"at most {most:,}") as refused:
        record.plan(targets, most + 1, record.config_cls())
    assert "36 adapted matrices" in str(refused.value) and "lower --budget" in str(refused.value)
    plan = record.plan(targets, most, record.config_cls())  # the maximum itself is allowed
    assert plan.budget == most


def test_the_cli_refuses_a_budget_the_model_cannot_hold(tiny_bert_dir, glue_dir, tmp_path):
    """0.3M on the tiny BERT (2 layers, hidden 32, FFN 64): at full rank its 12 matrices hold 2 x (4 x 32 x 64 +
    2 x 32 x 96) = 28,672 LoRA parameters."""
    from typer.testing import CliRunner

    from adalora_cli.cli import app

    result = CliRunner().invoke(app, ["train", "--task", "sst2", "--method", "lora", "--model", tiny_bert_dir,
                                      "--data-dir", str(glue_dir), "--budget", "0.3M", "--max-steps", "1",
                                      "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.stderr
    assert "budget 300,000 is more than the 12 adapted matrices can hold" in result.stderr
    assert "at most 28,672" in result.stderr and "Traceback" not in result.stderr
