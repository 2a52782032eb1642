"""Rank plans: `adalora plan` (a short AdaLoRA pass) writes each matrix's rank; `adalora train --method lora
--rank-plan` trains plain LoRA at exactly those ranks, exported for PEFT with its rank_pattern. Then the refusals."""

import json

import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import rankplan, rundir
from adalora_cli.budget import Target
from adalora_cli.cli import app
from adalora_cli.errors import UserError

runner = CliRunner()

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "it is what it is",
         "Фильм скучный и слишком длинный", "一部非常精彩的电影", "the best thing this year, and the funniest " * 8]

# A small budget from a high initial rank: some matrices of the tiny BERT (2 layers, hidden 32) end at rank 0.
PASS = ("--max-steps", "60", "--batch-size", "8", "--max-train-samples", "64", "--max-eval-samples", "16",
        "--max-seq-length", "32", "--budget", "1k", "--set", "adalora.init_r=8")


QUERY_VALUE = ("--set", 'lora.target_modules=["query", "value"]')


def common(model_dir, glue_dir):
    return ["--task", "sst2", "--model", model_dir, "--data-dir", str(glue_dir)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


def one_line_error(result, fragment):
    assert result.exit_code == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("adalora: error: ") and fragment in lines[-1], result.stderr
    assert not any("Traceback" in line for line in lines)


@pytest.fixture(scope="module")
def plans(tiny_bert_dir, glue_dir, tmp_path_factory):
    """A plan in each mode (the schedule pass keeps its run folder), made on first use and shared."""
    made = {}

    def get(mode):
        if mode not in made:
            folder = tmp_path_factory.mktemp(f"plan-{mode}")
            # scores: the options of a LoRA run on two matrices per layer, whose matrices the pass adapts
            method = ("--method", "lora", *QUERY_VALUE) if mode == "scores" else ()
            result = ok(invoke("plan", *common(tiny_bert_dir, glue_dir), *PASS, *method, "--plan-fraction", "0.1",
                               "--plan-mode", mode, "--output-dir", folder / "pass", "--out", folder / "plan.json"))
            (folder / "summary.txt").write_text(result.stdout)
            made[mode] = folder
        return made[mode]

    return get


@pytest.fixture(scope="module")
def planned_lora(plans, tiny_bert_dir, glue_dir, tmp_path_factory):
    """LoRA trained with the schedule plan, with no --budget (the plan's is the run's)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    ok(invoke("train", "--method", "lora", *common(tiny_bert_dir, glue_dir), "--max-steps", "4", "--batch-size", "8",
              "--max-train-samples", "32", "--max-eval-samples", "16", "--max-seq-length", "32",
              "--rank-plan", plans("schedule") / "plan.json", "--output-dir", out))
    return out


def test_plan_holds_the_short_runs_final_ranks(plans, tiny_bert_dir):
    folder = plans("schedule")
    data = json.loads((folder / "plan.json").read_text())
    assert data["kind"] == "adalora-cli rank plan" and data["version"] == 1
    assert data["model"] == tiny_bert_dir and data["model_type"] == "bert" and data["budget"] == 1000
    run = rundir.RunDir(folder / "pass")
    pattern = json.loads((run / rundir.RANK_PATTERN).read_text())
    assert {t["name"]: t["rank"] for t in data["targets"]} == pattern
    for target in data["targets"]:  # shapes, layers and kinds as the run recorded them
        info = run.adapter.modules[target["name"]]
        assert (target["d_in"], target["d_out"], target["layer"], target["kind"]) == \
               (info["d_in"], info["d_out"], info["layer"], info["kind"])
    assert data["params"] == sum(t["rank"] * (t["d_in"] + t["d_out"]) for t in data["targets"]) <= 1000
    assert 0 in pattern.values() and max(pattern.values()) > 0, "the tiny budget was meant to prune some to 0"
    made_by = data["made_by"]
    # --plan-fraction 0.1 of --max-steps 60: a pass of 6 optimizer steps, its run's length
    assert (made_by["mode"], made_by["steps"], made_by["of_steps"], made_by["seed"]) == ("schedule", 6, 60, 0)
    assert made_by["method"] == "adalora" and made_by["task"] == "sst2" and made_by["seconds"] > 0
    assert run.metrics["steps"] == 6 and run.metrics["eval"] == {}  # the pass evaluates nothing
    assert run.config.method == "adalora" and run.config.max_steps == 6
    assert (folder / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (folder / "summary.txt").read_text()
    zeros = sum(1 for r in pattern.values() if r == 0)
    assert f"12 matrices, total rank {sum(pattern.values())}, {zeros} at rank 0" in summary
    assert f"{data['params']:,} LoRA parameters (budget 1.0k)" in summary and "6 of 60 optimizer steps" in summary
    assert f"adalora train --method lora --rank-plan {folder / 'plan.json'}" in summary


def test_schedule_mode_prunes_along_the_compressed_schedule(plans):
    history = rundir.RunDir(plans("schedule") / "pass").rank_history
    # warm-up of 1 step (0.1 / 0.6 of 6), then a decay with an allocation every step down to the budget
    assert len(history) > 2 and history[-1]["budget"] == 1000
    budgets = [h["budget"] for h in history]
    assert budgets == sorted(budgets, reverse=True)


def test_scores_mode_allocates_once_at_the_last_step(plans, tiny_bert_dir, glue_dir, tmp_path):
    folder = plans("scores")
    history = rundir.RunDir(folder / "pass").rank_history
    # the full initial rank until the last step, then one allocation straight to the final budget
    assert [h["step"] for h in history] == [0, 6]
    assert history[0]["total_rank"] == 8 * 4 and history[1]["budget"] == 1000  # query and value of 2 layers
    pass_config = rundir.RunDir(folder / "pass").config
    assert pass_config.method == "adalora" and pass_config.method_config().t_init == 5  # --method lora: still adalora
    data = json.loads((folder / "plan.json").read_text())
    assert data["made_by"]["mode"] == "scores"
    assert sorted(t["kind"] for t in data["targets"]) == ["Wq", "Wq", "Wv", "Wv"]
    assert {t["name"]: t["rank"] for t in data["targets"]} == \
           json.loads((folder / "pass" / rundir.RANK_PATTERN).read_text())


def test_pass_schedule():
    from adalora_cli.methods.adalora import AdaLoraConfig, resolve_schedule

    cfg = AdaLoraConfig()  # t_init 0.1, t_final 0.4, delta_t 0.01 of the full run
    assert rankplan.pass_schedule(cfg, "schedule", 60, 600) == {"t_init": 10, "t_final": 0, "delta_t": 1}
    assert rankplan.pass_schedule(cfg, "scores", 60, 600) == {"t_init": 59, "t_final": 0, "delta_t": 1}
    # step counts are shares of the full run: 300 of 3000 warm-up, 1200 final, 60 between allocations
    steps = AdaLoraConfig(t_init=300, t_final=1200, delta_t=60)
    assert rankplan.pass_schedule(steps, "schedule", 300, 3000) == {"t_init": 50, "t_final": 0, "delta_t": 10}
    # a schedule that does not fit the full run keeps the proportions the full run would shrink it to
    # (t_init 0.5 and t_final 1.0 -> x 0.65 / 1.5: warm-up 0.217 of 0.567 before the final phase)
    too_long = AdaLoraConfig(t_init=500, t_final=1000)
    assert rankplan.pass_schedule(too_long, "schedule", 100, 1000) == {"t_init": 38, "t_final": 0, "delta_t": 1}
    for mode in rankplan.MODES:  # the schedule fits the pass as it is: never rescaled
        s = resolve_schedule(AdaLoraConfig(**rankplan.pass_schedule(cfg, mode, 7, 70)), 7)
        assert s.t_init + s.t_final < 7 and s.decay_steps >= 1


def test_lora_trains_with_exactly_the_planned_ranks(plans, planned_lora):
    plan = rankplan.read_plan(plans("schedule") / "plan.json")
    run = rundir.RunDir(planned_lora)
    assert json.loads((run / rundir.RANK_PATTERN).read_text()) == plan.ranks
    assert run.config.method == "lora" and run.config.rank_plan == str((plans("schedule") / "plan.json").resolve())
    assert run.config.budget == plan.budget == 1000  # no --budget: the plan's
    assert run.metrics["adapter_params"] == plan.params and run.metrics["budget"] == 1000
    alpha = run.config.method_config().alpha
    for name, info in run.adapter.modules.items():  # LoRA's own scale alpha / r at each planned rank
        assert info["scaling"] == (pytest.approx(alpha / info["rank"]) if info["rank"] else 0.0)


def test_peft_loads_the_planned_lora_with_our_logits(planned_lora, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForSequenceClassification

    ok(invoke("export-adapter", planned_lora, "--format", "peft", "--out", tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    pattern = json.loads((planned_lora / rundir.RANK_PATTERN).read_text())
    kept = {name: r for name, r in pattern.items() if r > 0}
    assert config["rank_pattern"] == kept and sorted(config["target_modules"]) == sorted(kept)
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=2)
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert {n.removeprefix("base_model.model."): m.r["default"] for n, m in theirs.named_modules()
            if isinstance(m, LoraLayer)} == kept
    for name in set(pattern) - set(kept):  # a matrix planned at rank 0 stays the plain linear layer
        assert type(theirs.get_submodule("base_model.model." + name)) is torch.nn.Linear
    _, _, ours, tokenizer, *_ = rundir.load_run(planned_lora)
    inputs = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)


def test_a_finished_run_folder_serves_as_a_plan(plans, planned_lora):
    from_run = rankplan.read_plan(planned_lora)
    from_file = rankplan.read_plan(plans("schedule") / "plan.json")
    assert from_run.ranks == from_file.ranks and from_run.targets == from_file.targets
    assert from_run.budget == 1000 and from_run.params == from_file.params


def test_plan_from_a_run_folder_trains(plans, tiny_bert_dir, glue_dir, tmp_path):
    """The AdaLoRA pass's own run folder given to --rank-plan, with a --budget of its own."""
    out = tmp_path / "run"
    ok(invoke("train", "--method", "lora", *common(tiny_bert_dir, glue_dir), "--max-steps", "2", "--batch-size", "8",
              "--max-train-samples", "16", "--max-eval-samples", "8", "--max-seq-length", "32", "--budget", "2k",
              *QUERY_VALUE, "--rank-plan", plans("scores") / "pass", "--output-dir", out))
    assert json.loads((out / rundir.RANK_PATTERN).read_text()) == \
           json.loads((plans("scores") / "pass" / rundir.RANK_PATTERN).read_text())
    assert rundir.RunDir(out).config.budget == 2000


# -- refusals: exit 2, one line, nothing written -----------------------------------------------------------------

def train_with_plan(tiny_bert_dir, glue_dir, out, plan, *extra):
    return invoke("train", *common(tiny_bert_dir, glue_dir), "--max-steps", "2", "--batch-size", "8",
                  "--max-train-samples", "16", "--max-seq-length", "32", "--rank-plan", plan,
                  "--output-dir", out, *extra)


def edited_plan(plans, tmp_path, edit):
    data = json.loads((plans("schedule") / "plan.json").read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def rename_first(data):
    data["targets"][0]["name"] = "bert.encoder.layer.9.attention.self.query"


def widen_first(data):
    data["targets"][0]["d_in"] = 384


@pytest.mark.parametrize("extra, edit, fragment", [
    (("--method", "adalora"), None, "use --method lora (not adalora)"),
    (("--method", "lora", "--budget", "500"), None, "over --budget 500; raise --budget to at least"),
    (("--method", "lora"), rename_first, "was made for other target matrices"),
    (("--method", "lora"), widen_first, "was made for another model"),
    (("--method", "lora"), lambda d: d.update(kind="something else"), "is not a rank plan"),
    (("--method", "lora"), lambda d: d["targets"][1].update(rank=-1), "is damaged"),
])
def test_refused_plans(plans, tiny_bert_dir, glue_dir, tmp_path, extra, edit, fragment):
    plan = plans("schedule") / "plan.json" if edit is None else edited_plan(plans, tmp_path, edit)
    out = tmp_path / "run"
    one_line_error(train_with_plan(tiny_bert_dir, glue_dir, out, plan, *extra), fragment)
    assert not out.exists()


@pytest.mark.parametrize("content, fragment", [(None, "does not exist"), ("{not json", "not readable JSON"),
                                               ("", "not readable JSON"), ("[]", "is not a rank plan")])
def test_missing_or_corrupt_plan_file(tiny_bert_dir, glue_dir, tmp_path, content, fragment):
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_text(content)
    out = tmp_path / "run"
    one_line_error(train_with_plan(tiny_bert_dir, glue_dir, out, plan, "--method", "lora"), fragment)
    assert not out.exists()


def test_plan_refuses_a_bad_request_before_any_work(tiny_bert_dir, glue_dir, tmp_path):
    base = ("plan", *common(tiny_bert_dir, glue_dir), "--max-steps", "10")
    one_line_error(invoke(*base, "--out", tmp_path / "p.json", "--plan-mode", "guess"), "unknown --plan-mode")
    one_line_error(invoke(*base, "--out", tmp_path / "p.json", "--plan-fraction", "0.1", "--plan-steps", "3"),
                   "not both")
    one_line_error(invoke(*base, "--out", tmp_path / "p.json", "--plan-fraction", "1.5"), "--plan-fraction")
    one_line_error(invoke(*base, "--out", tmp_path / "no" / "p.json"), "does not exist")
    (tmp_path / "old.json").write_text("{}")
    one_line_error(invoke(*base, "--out", tmp_path / "old.json"), "already exists; pass --overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def test_plan_for_targets_unit():
    targets = [Target("a", 8, 4, 0, "Wq"), Target("b", 8, 8, 0, "Wv")]
    plan = rankplan.RankPlanFile("p.json", "m", "bert", 100, [
        rankplan.PlannedTarget("a", 8, 4, 0, "Wq", 3), rankplan.PlannedTarget("b", 8, 8, 0, "Wv", 0)], {})
    assert plan.params == 36
    result = rankplan.plan_for_targets(plan, targets, 36)
    assert result.ranks == {"a": 3, "b": 0} and result.budget == 36
    with pytest.raises(UserError, match="over --budget 35"):
        rankplan.plan_for_targets(plan, targets, 35)
    with pytest.raises(UserError, match="other target matrices"):
        rankplan.plan_for_targets(plan, targets[:1], None)


def test_killed_then_resumed_planned_lora_equals_uninterrupted_run(plans, tiny_bert_dir, glue_dir, tmp_path):
    """--resume rebuilds the planned ranks (the plan's path is in config.yaml) and continues exactly."""
    import signal

    from conftest import ON_CPU
    from test_resume import run_cli, run_in_process

    from adalora_cli import files

    def args(out):
        return ["train", "--method", "lora", *common(tiny_bert_dir, glue_dir), "--max-steps", "8", "--batch-size", "8",
                "--max-train-samples", "64", "--max-eval-samples", "16", "--max-seq-length", "32",
                "--rank-plan", plans("schedule") / "plan.json", "--output-dir", out, "--set", "save_steps=2", *ON_CPU]

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_in_process(args(reference))
    killed = run_cli(args(resumed), ADALORA_TEST_KILL_AFTER_SAVE="4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = run_cli(["train", "--output-dir", resumed, "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    for name in (rundir.RANK_PATTERN, rundir.ADAPTER_CONFIG):
        assert json.loads((resumed / name).read_text()) == json.loads((reference / name).read_text()), name
    for name in (rundir.ADAPTER, rundir.HEAD):  # bit for bit
        a, b = files.load_tensors(resumed / name), files.load_tensors(reference / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((resumed / rundir.RANK_PATTERN).read_text()) == \
           rankplan.read_plan(plans("schedule") / "plan.json").ranks
