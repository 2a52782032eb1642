"""EVA (`--method eva`) against peft's EVA on the same weights and batches, the parameter budget, a real run, the
PEFT export and the user errors."""

from __future__ import annotations

import json
from itertools import cycle

import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import files, rundir
from adalora_cli.budget import Target
from adalora_cli.cli import app
from adalora_cli.inject import find_targets
from adalora_cli.methods import eva
from conftest import ON_CPU, tiny_model

SENTENCES = [
    "a gripping, beautifully acted film", "dull and far too long", "it is what it is",
    "the best thing this year, and the funniest", "I wanted to leave after ten minutes",
    "Фильм скучный, но актёры хороши", "这部电影非常精彩",
    "an uneven but often moving portrait of grief",
    "no", "the plot twists are predictable from the first scene, and the dialogue is worse",
    "charming", "a film that knows exactly what it wants to be and gets there with style and wit",
]
SQUARE = [r"attention\.self\.query", r"attention\.self\.key", r"attention\.self\.value", r"attention\.output\.dense"]
PEFT_SQUARE = ["query", "key", "value", "attention.output.dense"]


def batches(minilm_path, size=4, rounds=3):
    """Padded batches (attention masks with zeros) of short, long, Cyrillic and CJK sentences, no labels."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = SENTENCES * rounds
    return [dict(tokenizer(texts[i:i + size], padding=True, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def peft_eva(data, r, rho, tau, target_modules, alpha=8):
    """peft's EVA on a fresh tiny BERT: its ranks, initial A (module names as ours) and lora_alpha per module."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=rho, tau=tau))
    model = get_peft_model(tiny_model("bert"), config)
    initialize_lora_eva_weights(model, dataloader=data, show_progress_bar=False)
    layers = {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
              if isinstance(module, LoraLayer)}
    ranks = {name: layer.r["default"] for name, layer in layers.items()}
    weights = {name: layer.lora_A["default"].weight.detach() for name, layer in layers.items()}
    scalings = {name: layer.scaling["default"] for name, layer in layers.items()}
    return ranks, weights, scalings


def ours(data, targets_regex, budget, **settings):
    model = tiny_model("bert")
    targets = find_targets(model, "bert", targets_regex)
    cfg = eva.EvaConfig(alpha=8, max_batches=10_000, **settings)
    return targets, eva.from_data(model, targets, cycle(data), budget, cfg)


def assert_same_as_peft(init, peft_ranks, peft_a, peft_scalings):
    ranks = {name: r for name, r in init.plan.ranks.items() if r > 0}
    assert ranks == peft_ranks
    assert len(set(ranks.values())) > 1  # the ranks were redistributed, not left uniform
    # Signs: both sides sign each component so that its largest entry is positive (sklearn's rule), so no sign is
    # left to chance and A is compared as it is. The difference is float rounding of the same float64 arithmetic.
    worst = max((init.initial[name]["lora_A"] - peft_a[name]).abs().max().item() for name in ranks)
    print(f"max |A_ours - A_peft| = {worst:.3g}")
    assert worst < 1e-5
    assert init.scalings == pytest.approx(peft_scalings)


@pytest.mark.parametrize("r, rho", [(2, 4.0), (1, 4.0)])  # the value of layer 1 loses its tie with q, k; rank 0
def test_equal_shapes_give_peft_ranks_and_initial_a(minilm_path, r, rho):
    """q, k, v and the attention output all cost 64 per component: a budget of n * r * 64 parameters is peft's
    n * r components, so ranks, A and scales (alpha / r, adjusted) are peft's."""
    data = batches(minilm_path)
    tau = 0.95
    peft_ranks, peft_a, peft_scalings = peft_eva(data, r, rho, tau, PEFT_SQUARE)
    targets, init = ours(data, SQUARE, 8 * r * 64, r=r, rho=rho, tau=tau)
    assert len(targets) == 8 and {t.d_in + t.d_out for t in targets} == {64}
    assert sum(init.plan.ranks.values()) * 64 == 8 * r * 64  # the budget spent exactly
    assert_same_as_peft(init, peft_ranks, peft_a, peft_scalings)


def test_without_a_budget_mixed_shapes_give_peft_ranks_and_initial_a(minilm_path):
    """Without --budget the budget is peft's, n * r components, on any shapes (here all six matrices)."""
    data = batches(minilm_path)
    peft_ranks, peft_a, peft_scalings = peft_eva(data, 2, 2.0, 0.95, PEFT_SQUARE + ["intermediate.dense",
                                                                                     "output.dense"])
    targets, init = ours(data, None, None, r=2, rho=2.0, tau=0.95)
    assert {t.d_in + t.d_out for t in targets} == {64, 96}
    assert_same_as_peft(init, peft_ranks, peft_a, peft_scalings)


def test_with_mixed_shapes_the_parameter_budget_decides(minilm_path):
    """The documented difference: with FFN matrices (96 per component) beside attention ones (64), peft counts
    components and we count parameters. Given the parameters peft's ranks cost, ours spend no more, and within
    one component of it."""
    data = batches(minilm_path)
    peft_ranks, *_ = peft_eva(data, 2, 2.0, 0.95, PEFT_SQUARE + ["intermediate.dense", "output.dense"])
    targets, _ = ours(data, None, None, r=2, tau=0.95)
    cost = {t.name: t.d_in + t.d_out for t in targets}
    budget = sum(r * cost[name] for name, r in peft_ranks.items())
    _, init = ours(data, None, budget, tau=0.95)
    spent = sum(r * cost[name] for name, r in init.plan.ranks.items())
    assert budget - max(cost.values()) < spent <= budget
    assert {name: init.initial[name]["lora_A"].shape[0] for name in init.initial} == \
        {name: r for name, r in init.plan.ranks.items() if r > 0}


def test_whitening_differs_from_peft_only_where_peft_divides_shared_components_again(minilm_path):
    """The documented difference under whiten=True: peft divides the components of a shared PCA in place, once for
    every target of the group (q, k, v) holding that row, and its A of those targets are views of them. Ours divides
    a copy once: where a PCA serves one target (the attention output) A is peft's; for q, k, v peft's row j is ours
    divided by sqrt(s_j) once more for every further target of the group at rank > j."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
    from peft.tuners.lora import LoraLayer

    data = batches(minilm_path)
    config = LoraConfig(r=2, lora_alpha=8, target_modules=PEFT_SQUARE, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=4.0, tau=0.95, whiten=True))
    model = get_peft_model(tiny_model("bert"), config)
    initialize_lora_eva_weights(model, dataloader=data, show_progress_bar=False)
    theirs = {name.removeprefix("base_model.model."): module.lora_A["default"].weight.detach()
              for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    _, plain = ours(data, SQUARE, 8 * 2 * 64, r=2, rho=4.0, tau=0.95)
    _, white = ours(data, SQUARE, 8 * 2 * 64, r=2, rho=4.0, tau=0.95, whiten=True)
    ranks = white.plan.ranks
    assert ranks == plain.plan.ranks and len(set(ranks.values())) > 1
    for name, tensors in white.initial.items():
        a = tensors["lora_A"]
        sqrt_s = plain.initial[name]["lora_A"].norm(dim=1) / a.norm(dim=1)  # unwhitened rows have norm 1
        group = [n for n in ranks if n.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]]  # q, k, v: prefix ...self
        extra = torch.tensor([sum(ranks[n] > j for n in group) - 1 for j in range(a.shape[0])])
        torch.testing.assert_close(theirs[name], a / sqrt_s.pow(extra).view(-1, 1), atol=1e-6, rtol=1e-4)


def test_ranks_keep_the_highest_ratios_that_fit_the_budget():
    """Three targets costing 10, 10 and 30 per component; ratios pooled highest first, a component that no longer
    fits is passed over (the 0.5 of `c`), a cheaper one further down is kept."""
    targets = [Target("a", 5, 5, 0, "Wq"), Target("b", 5, 5, 0, "Wk"), Target("c", 10, 20, 0, "Wf1")]
    ratios = {"a": torch.tensor([0.45, 0.1, 0.05]), "b": torch.tensor([0.4, 0.2, 0.01]),
              "c": torch.tensor([0.6, 0.5, 0.3])}
    caps = {"a": 3, "b": 3, "c": 3}
    # order: c0 .6 (30), c1 .5 (30), a0 .45 (10), b0 .4 (10), c2 .3 (30), b1 .2, a1 .1, a2 .05, b2 .01
    assert eva.distribute_ranks(targets, ratios, caps, 80, 0) == {"a": 1, "b": 1, "c": 2}  # 30+30+10+10 = 80
    assert eva.distribute_ranks(targets, ratios, caps, 50, 0) == {"a": 1, "b": 1, "c": 1}  # c1 passed over
    assert eva.distribute_ranks(targets, ratios, caps, 75, 0) == {"a": 1, "b": 0, "c": 2}  # 5 left unspent
    assert eva.distribute_ranks(targets, ratios, caps, None, 4) == {"a": 1, "b": 1, "c": 2}  # peft: 4 components
    assert eva.distribute_ranks(targets, ratios, {"a": 1, "b": 1, "c": 1}, 80, 0) == {"a": 1, "b": 1, "c": 1}


def test_the_first_of_a_group_of_identical_inputs_gets_its_largest_rank():
    """a and b see the same input (equal ratios): when the cut splits their tie, the rank goes to a, whose PCA
    serves both (peft's swap), so a's components cover every rank of the group."""
    targets = [Target("a", 5, 5, 0, "Wq"), Target("b", 5, 5, 0, "Wk")]
    same = torch.tensor([0.5, 0.3])
    ranks = eva.distribute_ranks(targets, {"a": same, "b": same}, {"a": 2, "b": 2}, 30, 0, [["a", "b"]])
    assert ranks == {"a": 2, "b": 1}


def test_padding_does_not_count(minilm_path):
    """The same sentences padded to 64 tokens give the same components: padded positions are left out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = SENTENCES * 2
    short = [dict(tokenizer(texts[i:i + 4], padding=True, return_tensors="pt")) for i in range(0, len(texts), 4)]
    long = [dict(tokenizer(texts[i:i + 4], padding="max_length", max_length=64, return_tensors="pt"))
            for i in range(0, len(texts), 4)]
    assert short[0]["input_ids"].shape[1] < 64
    _, a = ours(short, SQUARE, 8 * 2 * 64, tau=0.9)
    _, b = ours(long, SQUARE, 8 * 2 * 64, tau=0.9)
    assert a.plan.ranks == b.plan.ranks
    for name, tensors in a.initial.items():
        torch.testing.assert_close(tensors["lora_A"], b.initial[name]["lora_A"], atol=1e-4, rtol=0)


def test_per_token_labels_mask_only_with_label_mask():
    mask = torch.tensor([[1, 1, 1, 0]])
    batch = {"attention_mask": mask, "labels": torch.tensor([[-100, 3, -100, -100]])}
    assert eva.token_mask(batch, False).tolist() == [[True, True, True, False]]
    assert eva.token_mask(batch, True).tolist() == [[False, True, False, False]]
    sequence_label = {"attention_mask": mask, "labels": torch.tensor([1])}
    assert eva.token_mask(sequence_label, True).tolist() == [[True, True, True, False]]


def train_args(model, glue_dir, out, *extra):
    return ["train", "--task", "sst2", "--method", "eva", "--model", model, "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--max-steps", "4", "--batch-size", "8", "--max-train-samples", "64",
            "--max-eval-samples", "32", "--max-seq-length", "32", *extra]


def test_minilm_run_trains_evaluates_and_exports_for_peft(minilm_path, glue_dir, tmp_path):
    """A short real run on MiniLM and SST-2: ranks from the data within the budget, one scale alpha / uniform
    rank, and a PEFT export that loads in PeftModel with our ranks and logits."""
    from test_export import TEXTS, export_cli, our_logits, peft_model, peft_ranks

    out = tmp_path / "run"
    result = CliRunner().invoke(app, train_args("minilm-l6", glue_dir, out, "--budget", "50k", *ON_CPU))
    assert result.exit_code == 0, result.stderr[-3000:]
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert metrics["method"] == "eva" and 0 <= metrics["eval"]["accuracy"] <= 1
    assert 50_000 - 1536 - 384 < metrics["adapter_params"] <= 50_000
    pattern = json.loads((out / rundir.RANK_PATTERN).read_text())
    assert len(pattern) == 36 and len(set(pattern.values())) > 1
    saved = rundir.RunDir(out).adapter
    uniform = 50_000 // sum(info["d_in"] + info["d_out"] for info in saved.modules.values())
    assert {info["scaling"] for info in saved.modules.values() if info["rank"]} == {16.0 / uniform}
    exported = export_cli(out, "peft", tmp_path / "peft", "--base-model", minilm_path)  # offline: a local copy
    assert exported.exit_code == 0, exported.stderr
    theirs = peft_model(out, tmp_path / "peft")
    assert peft_ranks(theirs) == {name: r for name, r in pattern.items() if r > 0}
    tokenizer = rundir.load_run(out)[3]
    with torch.no_grad():
        logits = theirs(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits, our_logits(out), atol=1e-4, rtol=0)


def test_the_run_starts_from_the_data_pass(tiny_bert_dir, glue_dir, tmp_path):
    """At a learning rate of 1e-12 the saved adapter is the initial one up to 4 steps of 1e-12: B zero, and every
    A of orthonormal rows (principal directions, not LoRA's random A), at the ranks of rank_pattern.json."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, train_args(tiny_bert_dir, glue_dir, out, "--budget", "4k", "--lr", "1e-12",
                                                "--set", "eva.tau=0.9", *ON_CPU))
    assert result.exit_code == 0, result.stderr[-3000:]
    tensors = files.load_tensors(out / rundir.ADAPTER)
    pattern = json.loads((out / rundir.RANK_PATTERN).read_text())
    assert len(set(pattern.values())) > 1
    for name, rank in pattern.items():
        if rank == 0:
            assert f"{name}.lora_A" not in tensors
            continue
        a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        assert a.shape[0] == rank and b.abs().max() < 1e-9
        torch.testing.assert_close(a @ a.T, torch.eye(rank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting, fragment", [
    ("eva.rho=0.5", "eva.rho must be at least 1"),
    ("eva.tau=1.5", "eva.tau must be in [0, 1]"),
    ("eva.max_batches=1", "eva.max_batches must be at least 2"),
    ("eva.r=0", "eva.r must be at least 1"),
])
def test_bad_settings_fail_in_one_line(tiny_bert_dir, glue_dir, tmp_path, setting, fragment):
    result = CliRunner().invoke(app, train_args(tiny_bert_dir, glue_dir, tmp_path / "run", "--set", setting))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_budget_below_one_component_per_matrix_fails_before_loading(tiny_bert_dir, glue_dir, tmp_path):
    result = CliRunner().invoke(app, train_args(tiny_bert_dir, glue_dir, tmp_path / "run", "--budget", "100"))
    assert result.exit_code == 2 and "below one rank per adapted matrix" in result.stderr
