"""The rank-allocation report: the table's cells and totals from a run's files, the PNG it writes, and the
same report on a real (tiny) AdaLoRA run."""

import json

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from adalora_cli import files, report, rundir
from adalora_cli.cli import app
from adalora_cli.config import RunConfig, dump_yaml
from adalora_cli.rundir import RunDir

runner = CliRunner()

KINDS = ("Wq", "Wk", "Wv", "Wo", "Wf1", "Wf2")
RANKS = {  # layer -> ranks of Wq..Wf2; a 0 is a matrix pruned away
    0: (3, 0, 5, 2, 1, 4),
    1: (2, 6, 0, 3, 2, 2),
    2: (1, 1, 4, 0, 5, 3),
}


def fake_run(path, method="adalora", budget=5000, history=True, ranks=RANKS):
    """A run folder with only the files the report reads: nothing needs training or a model."""
    path.mkdir()
    cfg = RunConfig(task="sst2", method=method, model="minilm-l6", budget=budget)
    dump_yaml(cfg.to_dict(), path / rundir.CONFIG)
    modules = {}
    for layer, row in ranks.items():
        for kind, rank in zip(KINDS, row):
            d_in, d_out = (32, 64) if kind == "Wf1" else (64, 32) if kind == "Wf2" else (32, 32)
            modules[f"encoder.layer.{layer}.{kind.lower()}"] = {"rank": rank, "scaling": 2.0, "d_in": d_in,
                                                                 "d_out": d_out, "kind": kind, "layer": layer}
    files.write_json(path / rundir.ADAPTER_CONFIG, {"format": rundir.FORMAT, "method": method, "base_model": "x",
                                                     "task": "sst2", "modules": modules, "head": []})
    files.write_json(path / rundir.METRICS, {"adapter_params": 4321, "steps": 100})
    if history:
        files.write_json(path / rundir.RANK_HISTORY, [
            {"step": 0, "budget": 9000, "adapter_params": 9000, "total_rank": 80},
            {"step": 20, "budget": 7000, "adapter_params": 6900, "total_rank": 60},
            {"step": 40, "budget": 5000, "adapter_params": 4321, "total_rank": 44},
        ])
    return path


def test_table_cells_and_totals(tmp_path):
    table = report.format_table(report.read_allocation(fake_run(tmp_path / "run")))
    rows = [line.replace("|", " ").split() for line in table.splitlines()]
    assert rows[0] == ["layer", *KINDS, "total"]
    for layer, ranks in RANKS.items():
        assert rows[1 + layer] == [str(layer), *map(str, ranks), str(sum(ranks))]
    column_totals = [sum(RANKS[layer][i] for layer in RANKS) for i in range(6)]
    assert rows[5] == ["total", *map(str, column_totals), "44"]
    assert "matrices: 18 adapted, 3 pruned to rank 0; total rank 44" in table
    assert "adapter parameters: 4,321 of a budget of 5,000 (86.4%); 9,000 at the start of training" in table


def test_matrices_outside_the_presets_get_their_own_columns(tmp_path):
    run = fake_run(tmp_path / "run", history=False)
    config = json.loads((run / rundir.ADAPTER_CONFIG).read_text())
    config["modules"] = {"a.layer.0.query": {"rank": 2, "kind": "query", "layer": 0},
                         "a.layer.1.query": {"rank": 3, "kind": "query", "layer": 1},
                         "a.layer.1.value": {"rank": 4, "kind": "Wv", "layer": 1}}
    (run / rundir.ADAPTER_CONFIG).write_text(json.dumps(config))
    rows = [line.replace("|", " ").split() for line in report.format_table(report.read_allocation(run)).splitlines()]
    assert rows[0] == ["layer", "Wv", "query", "total"]
    assert rows[1] == ["0", "-", "2", "2"] and rows[2] == ["1", "4", "3", "7"]


def test_inspect_prints_the_table_and_writes_the_png(tmp_path):
    run = fake_run(tmp_path / "run")
    result = runner.invoke(app, ["inspect", str(run)])
    assert result.exit_code == 0, result.stderr
    assert report.format_table(report.read_allocation(run)) in result.stdout
    png = run / RunDir.RANK_PLOT
    assert f"wrote {png}" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(png).shape[:2]
    assert width > 1.5 * height > 400  # two panels side by side: heat map and budget curve
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_without_history_only_the_heat_map_is_drawn(tmp_path):
    with_history = fake_run(tmp_path / "ada")
    without = fake_run(tmp_path / "lora", method="lora", history=False)
    report.write_report(with_history)
    report.write_report(without)
    wide, narrow = imread(with_history / RunDir.RANK_PLOT), imread(without / RunDir.RANK_PLOT)
    assert narrow.shape[0] == wide.shape[0] and narrow.shape[1] < 0.7 * wide.shape[1]


def test_a_run_without_a_parameter_budget_plots_ranks(tmp_path):
    run = fake_run(tmp_path / "run", budget=None)
    table, png = report.write_report(run)
    assert "no parameter budget" in table and png.is_file()


@pytest.mark.parametrize("setup, fragment", [
    ("empty", "is not a run directory"),
    ("full", "has no rank allocation"),
])
def test_inspect_errors(tmp_path, setup, fragment):
    run = tmp_path / "run"
    if setup == "empty":
        run.mkdir()
    else:
        fake_run(run, method="full", budget=None, history=False, ranks={})
    result = runner.invoke(app, ["inspect", str(run)])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("adalora: error:") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (run / RunDir.RANK_PLOT).exists()


def test_report_of_a_trained_adalora_run(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "ada"
    args = ["train", "--task", "sst2", "--method", "adalora", "--budget", "4k", "--model", tiny_bert_dir,
            "--data-dir", str(glue_dir), "--output-dir", str(out), "--max-steps", "6", "--batch-size", "8",
            "--max-train-samples", "64", "--max-eval-samples", "16", "--max-seq-length", "32",
            "--set", "adalora.t_init=1", "--set", "adalora.t_final=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    png = out / RunDir.RANK_PLOT
    assert png.is_file()  # training drew it
    png.unlink()
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.stderr
    assert png.is_file()
    pattern = json.loads((out / rundir.RANK_PATTERN).read_text())
    rows = {line.split()[0]: line.replace("|", " ").split()[1:] for line in result.stdout.splitlines()[1:4]}
    for layer in (0, 1):
        expected = [pattern[f"bert.encoder.layer.{layer}.{suffix}"] for suffix in (
            "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense")]
        assert rows[str(layer)] == [*map(str, expected), str(sum(expected))]
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert f"adapter parameters: {metrics['adapter_params']:,} of a budget of 4,000" in result.stdout
