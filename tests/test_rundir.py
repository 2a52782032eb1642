"""The run directory: `adalora eval` reads each of a run's files once and resolves the precision once, and the
tokenizer folder is written atomically."""

import builtins
import io
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adalora_cli import config, rundir
from adalora_cli.cli import app
from conftest import train_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def dylora_run(tiny_bert_dir, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dylora"
    train_tiny("dylora", "--task", "sst2", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", out,
               "--max-steps", "2", "--batch-size", "4", "--max-train-samples", "16", "--max-eval-samples", "8",
               "--max-seq-length", "16", "--set", "dylora.r_max=3")
    return out


@pytest.fixture
def run(dylora_run, tmp_path):
    return Path(shutil.copytree(dylora_run, tmp_path / "run", ignore=shutil.ignore_patterns(rundir.CHECKPOINTS)))


@pytest.fixture
def opened(monkeypatch):
    """The paths opened (for reading or writing) while the test runs, in order."""
    seen = []
    for module in (io, builtins):
        real = module.open

        def counting(file, *args, _real=real, **kwargs):
            if isinstance(file, (str, Path)):
                seen.append(Path(file).resolve())
            return _real(file, *args, **kwargs)

        monkeypatch.setattr(module, "open", counting)
    return seen


def test_eval_reads_the_config_and_the_adapter_record_once(run, opened):
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.stderr
    assert opened.count((run / rundir.CONFIG).resolve()) == 1
    assert opened.count((run / rundir.ADAPTER_CONFIG).resolve()) == 1
    assert "accuracy" in json.loads((run / "eval.json").read_text())["eval"]


def test_a_rank_sweep_resolves_the_precision_once(run, monkeypatch):
    from adalora_cli import devices

    calls = []
    real = devices.resolve_precision

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(devices, "resolve_precision", counting)
    result = runner.invoke(app, ["eval", str(run), "--rank-sweep"])
    assert result.exit_code == 0, result.stderr
    assert sorted(json.loads((run / "eval_ranks.json").read_text())) == ["1", "2", "3"]
    assert len(calls) == 1


class BrokenTokenizer:
    """Writes part of its files, then fails, as a full disk would."""

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer_config.json").write_text("{")
        raise OSError("no space left on device")


class Tokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def test_a_failed_tokenizer_save_leaves_no_temporary_folder(tmp_path):
    run = rundir.RunDir(tmp_path)
    with pytest.raises(OSError, match="no space"):
        run.save_tokenizer(BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []
    run.save_tokenizer(Tokenizer())
    with pytest.raises(OSError, match="no space"):  # a resumed run saving it again: the old folder stays whole
        run.save_tokenizer(BrokenTokenizer())
    assert [p.name for p in tmp_path.iterdir()] == [rundir.TOKENIZER]
    assert [p.name for p in (tmp_path / rundir.TOKENIZER).iterdir()] == ["tokenizer.json"]


def test_the_run_config_is_read_once_per_run_object(run, monkeypatch):
    reads = []
    real = config.read_yaml
    monkeypatch.setattr(config, "read_yaml", lambda path: reads.append(path) or real(path))
    folder = rundir.RunDir(run, data_dir="/elsewhere")
    assert folder.config is folder.config and folder.config.data_dir == "/elsewhere"
    assert folder.adapter is folder.adapter and folder.adapter.method == "dylora"
    assert len(reads) == 1


def test_a_file_written_again_is_read_again(tmp_path):
    run = rundir.RunDir(tmp_path)
    assert run.metrics == {} and run.rank_history == []  # absent: training has not finished
    run.write_json(run.METRICS, {"steps": 3, "eval": {"accuracy": 0.75}})
    run.write_json(run.RANK_HISTORY, [{"step": 1, "budget": 64}])
    assert run.metrics == {"steps": 3, "eval": {"accuracy": 0.75}} and run.rank_history == [{"step": 1, "budget": 64}]
    run.reset()
    assert run.metrics == {} and list(tmp_path.iterdir()) == []
