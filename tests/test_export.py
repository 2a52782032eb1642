"""`adalora export-adapter`, checked by the real clients: for every registered method, a tiny run exported
for PEFT is loaded by `peft.PeftModel.from_pretrained` and the merged one by plain Transformers in a fresh
process, and both give our logits; the native one is evaluated by `adalora eval`. Then the user errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import export, files, rundir
from adalora_cli.cli import app
from adalora_cli.errors import UserError
from adalora_cli.methods import available_methods, get_method
from adalora_cli.methods.base import LoraFactors
from conftest import tiny_config, train_tiny

runner = CliRunner()

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "it is what it is",
         "the best thing this year, and the funniest", "I wanted to leave after ten minutes"]


def train(model_dir, glue_dir, out, method, *extra):
    train_tiny(method, "--task", "sst2", "--model", model_dir, "--data-dir", glue_dir, "--output-dir", out,
               "--max-steps", "6", "--batch-size", "8", "--max-train-samples", "64", "--max-eval-samples", "48",
               "--max-seq-length", "32", "--set", "adalora.t_init=1", "--set", "adalora.t_final=2", *extra)
    return out


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, glue_dir, tmp_path_factory):
    """One tiny run per method (and variant), trained on first use and shared by the tests of this file."""
    cache = {}

    def get(method, *extra, model_dir=tiny_bert_dir):
        key = (method, extra, model_dir)
        if key not in cache:
            cache[key] = train(model_dir, glue_dir, tmp_path_factory.mktemp("runs") / method, method, *extra)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def tiny_deberta_dir(tmp_path_factory, minilm_path):
    """A tiny random DeBERTa-v2 folder without a pooler or classifier: both become head modules of the run."""
    from transformers import AutoModel, AutoTokenizer


    path = tmp_path_factory.mktemp("tiny-deberta")
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("deberta-v2")).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return path


def export_cli(run, fmt, out, *extra):
    return runner.invoke(app, ["export-adapter", str(run), "--format", fmt, "--out", str(out), *extra])


def our_logits(run):
    _, _, model, tokenizer, *_ = rundir.load_run(run)
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def peft_model(run, folder):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    return PeftModel.from_pretrained(base, str(folder)).eval()


def peft_ranks(model) -> dict[str, int]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): module.r["default"]
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def check_peft_round_trip(run, out):
    result = export_cli(run, "peft", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "labels.json"]
    model = peft_model(run, out)
    tokenizer = rundir.load_run(run)[3]
    with torch.no_grad():
        theirs = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(theirs, our_logits(run), atol=1e-4, rtol=0)
    pattern = json.loads((run / rundir.RANK_PATTERN).read_text())
    assert peft_ranks(model) == {name: r for name, r in pattern.items() if r > 0}
    return model, pattern


@pytest.mark.parametrize("method", [m for m in available_methods() if get_method(m).adapter])
def test_peft_export_loads_in_peft_with_our_logits_and_ranks(trained, tmp_path, method):
    run = trained(method)
    model, _ = check_peft_round_trip(run, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"]
    saved = rundir.RunDir(run).adapter
    for name, info in saved.modules.items():  # PEFT's scale alpha / r is ours, module by module
        if info["rank"]:
            assert config["alpha_pattern"][name] / config["rank_pattern"][name] == pytest.approx(info["scaling"])
    # the head PEFT restored is the trained one, not the base model's random classifier
    trained_head = files.load_tensors(run / rundir.HEAD)
    restored = dict(model.named_parameters())
    torch.testing.assert_close(restored["base_model.model.classifier.modules_to_save.default.weight"],
                               trained_head["classifier.weight"])


# A small budget from a high initial rank, pruned in a few steps: some matrices end at rank 0.
PRUNED = ("--budget", "1k", "--set", "adalora.init_r=8")
ANY_RANK = [m for m in available_methods() if get_method(m).any_rank]


def test_peft_export_leaves_out_modules_pruned_to_rank_zero(trained, tmp_path):
    run = trained("adalora", *PRUNED)
    model, pattern = check_peft_round_trip(run, tmp_path / "peft")
    pruned = [name for name, r in pattern.items() if r == 0]
    assert pruned, "the run was meant to prune some matrices to rank 0"
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert not set(pruned) & set(config["target_modules"])
    for name in pruned:
        assert type(model.get_submodule("base_model.model." + name)) is torch.nn.Linear


def test_peft_export_of_deberta_saves_the_pooler(trained, tiny_deberta_dir, tmp_path):
    run = trained("lora", model_dir=tiny_deberta_dir)
    assert any(name.startswith("pooler.") for name in rundir.RunDir(run).adapter.head)
    check_peft_round_trip(run, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["classifier", "pooler"]


MERGED_CHILD = """
import json, sys
import torch, transformers
folders, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
results = {}
for key, folder in folders.items():
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    results[key] = {"logits": logits.tolist(), "id2label": model.config.id2label}
assert "adalora_cli" not in sys.modules and "peft" not in sys.modules, "the merged model must load without them"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    """The merged export of every method (plus a run with matrices pruned to rank 0, and any-rank adapters
    at rank 2), loaded by plain Transformers in one fresh Python: starting torch costs seconds per process.
    Returns case -> (run, export folder, {"logits", "id2label"})."""
    cases = {method: (trained(method), ()) for method in available_methods()}
    cases["adalora-pruned"] = (trained("adalora", *PRUNED), ())
    cases.update({f"{method}-rank2": (trained(method), ("--rank", "2")) for method in ANY_RANK})
    root = tmp_path_factory.mktemp("merged")
    for key, (run, extra) in cases.items():
        result = export_cli(run, "merged", root / key, *extra)
        assert result.exit_code == 0, result.stderr + result.stdout
    folders = {key: str(root / key) for key in cases}
    proc = subprocess.run([sys.executable, "-c", MERGED_CHILD, json.dumps(folders), json.dumps(TEXTS)],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    return {key: (run, root / key, loaded[key]) for key, (run, _) in cases.items()}


@pytest.mark.parametrize("case", [*available_methods(), "adalora-pruned"])
def test_merged_export_loads_in_plain_transformers_with_our_logits(merged, case):
    run, folder, loaded = merged[case]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), our_logits(run), atol=1e-4, rtol=0)
    assert loaded["id2label"] == {"0": "negative", "1": "positive"}
    assert not any(".lora_" in key or ".base." in key for key in files.load_tensors(folder / "model.safetensors"))


@pytest.mark.parametrize("method", available_methods())
def test_native_export_evaluates_like_the_run(trained, tmp_path, method):
    run = trained(method)
    # adaptive methods draw their rank allocation at the end of training; the others have nothing to draw
    assert (run / "rank_allocation.png").is_file() == (get_method(method).make_allocator is not None)
    out = tmp_path / "native"
    result = export_cli(run, "native", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    weights = rundir.ADAPTER if get_method(method).adapter else rundir.FULL_WEIGHTS
    for name in (rundir.CONFIG, rundir.ADAPTER_CONFIG, weights, rundir.HEAD):
        assert (out / name).read_bytes() == (run / name).read_bytes(), name
    assert (out / rundir.TOKENIZER).is_dir() and not (out / rundir.CHECKPOINTS).exists()
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.stderr
    evaluated = json.loads((out / "eval.json").read_text())["eval"]
    assert evaluated == pytest.approx(json.loads((run / rundir.METRICS).read_text())["eval"], abs=1e-6)


@pytest.mark.parametrize("method", ANY_RANK)
def test_any_rank_adapter_exports_at_a_chosen_rank(trained, merged, tmp_path, method):
    run = trained(method)
    _, _, model, tokenizer, layers, _ = rundir.load_run(run)
    for layer in layers.values():
        layer.set_rank(2)
    with torch.no_grad():
        ours = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert export_cli(run, "peft", tmp_path / "peft", "--rank", "2").exit_code == 0
    theirs = peft_model(run, tmp_path / "peft")
    assert set(peft_ranks(theirs).values()) == {2}
    with torch.no_grad():
        torch.testing.assert_close(theirs(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, ours,
                                   atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(merged[f"{method}-rank2"][2]["logits"]), ours, atol=1e-4, rtol=0)


def test_overwrite_replaces_an_export(trained, tmp_path):
    run, out = trained("lora"), tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = export_cli(run, "peft", out)
    assert result.exit_code == 2 and "pass --overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert export_cli(run, "peft", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "labels.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it


# -- user errors: one line, exit 2, nothing written ------------------------------------------------------

def assert_clean_failure(result, fragment, out):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adalora: error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def copy_run(run, dest):
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(rundir.CHECKPOINTS))
    return dest


@pytest.mark.parametrize("args, fragment", [
    (["--format", "onnx"], "unknown export format 'onnx'; choose one of: native, peft, merged"),
    ([], "no export format; pass --format"),
])
def test_format_errors(trained, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-adapter", str(trained("lora")), "--out", str(out), *args])
    assert_clean_failure(result, fragment, out)


def test_missing_out(trained, tmp_path):
    result = runner.invoke(app, ["export-adapter", str(trained("lora")), "--format", "peft"])
    assert result.exit_code == 2 and result.stderr.strip() == "adalora: error: no output folder; pass --out DIR"


def test_not_a_run(tmp_path):
    assert_clean_failure(export_cli(tmp_path, "peft", tmp_path / "out"), "is not a run directory", tmp_path / "out")
    assert_clean_failure(export_cli(tmp_path / "nope", "peft", tmp_path / "out"), "does not exist", tmp_path / "out")


def test_peft_export_of_full_fine_tuning_suggests_merged(trained, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(export_cli(trained("full"), "peft", out), "use --format merged", out)


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", "corrupt or truncated"),
    ("delete", "is missing"),
])
@pytest.mark.parametrize("file", [rundir.ADAPTER, rundir.HEAD])
def test_damaged_run(trained, tmp_path, damage, fragment, file):
    run = copy_run(trained("adalora"), tmp_path / "run")
    path = run / file
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    out = tmp_path / "exports" / "out"
    for fmt in export.FORMATS:
        assert_clean_failure(export_cli(run, fmt, out), fragment, out)
    assert not out.parent.exists()


def test_rank_errors(trained, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(export_cli(trained("lora"), "peft", out, "--rank", "2"),
                         "--rank needs an adapter trained for any rank", out)
    if ANY_RANK:
        run = trained(ANY_RANK[0])
        assert_clean_failure(export_cli(run, "peft", out, "--rank", "99"), "rank 99 is outside 1..", out)
        assert_clean_failure(export_cli(run, "native", out, "--rank", "2"), "use --rank with --format peft", out)


def test_out_must_not_be_the_run(trained, tmp_path):
    run = copy_run(trained("lora"), tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    result = export_cli(run, "merged", run, "--overwrite")
    assert result.exit_code == 2 and "would replace the run folder" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_failure_while_writing_leaves_nothing(trained, tmp_path, monkeypatch):
    def broken(folder, *args):
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_peft", broken)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export.run_export(trained("lora"), "peft", out)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_overwriting_keeps_the_previous_export(trained, tmp_path, monkeypatch):
    run, out = trained("lora"), tmp_path / "out"
    assert export_cli(run, "merged", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(folder, *args):
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_peft", broken)
    with pytest.raises(KeyboardInterrupt):
        export.run_export(run, "peft", out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder beside it
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- pieces ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head, modules", [
    (["classifier.bias", "classifier.weight"], ["classifier"]),
    (["classifier.weight", "pooler.dense.bias", "pooler.dense.weight"], ["classifier", "pooler"]),
    (["classifier.dense.weight", "classifier.out_proj.weight"], ["classifier"]),  # RoBERTa's head
    (["qa_outputs.bias", "qa_outputs.weight"], ["qa_outputs"]),
    (["bert.pooler.dense.weight", "classifier.weight"], ["bert.pooler", "classifier"]),
])
def test_head_modules(head, modules):
    assert export.head_modules(head) == modules


def test_lora_factors_at_a_chosen_rank():
    class AnyRank:
        active = 3

        def set_rank(self, b):
            self.active = b

        def to_lora(self):
            return LoraFactors(torch.ones(4, 3)[:, :self.active], torch.ones(3, 5)[:self.active], 2.0 / self.active)

    class Fixed:
        def to_lora(self):
            return LoraFactors(torch.ones(4, 3), torch.ones(3, 5), 1.0)

    assert export.lora_factors({"m": AnyRank()})["m"].rank == 3
    assert export.lora_factors({"m": AnyRank()}, rank=2)["m"].rank == 2
    assert export.lora_factors({"m": Fixed()})["m"].rank == 3
    with pytest.raises(UserError, match="one fixed rank"):
        export.lora_factors({"m": Fixed()}, rank=2)


def test_help_lists_the_export_and_inspect_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "export-adapter" in result.stdout and "inspect" in result.stdout
    result = runner.invoke(app, ["export-adapter", "--help"])
    assert result.exit_code == 0 and all(f in result.stdout for f in ("native", "peft", "merged", "--overwrite"))


# -- the base model a PEFT export names ---------------------------------------------------------------------

def peft_base(out) -> str:
    return json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_peft_export_of_the_embedded_model_names_its_hub_id(trained, tmp_path):
    """Not the folder inside this machine's Python installation, which no other machine has."""
    run = trained("lora", "--budget", "50k", model_dir="minilm-l6")
    assert export_cli(run, "peft", tmp_path / "peft").exit_code == 0
    assert peft_base(tmp_path / "peft") == "sentence-transformers/all-MiniLM-L6-v2"
    assert "/" + "site-packages" not in (tmp_path / "peft" / "adapter_config.json").read_text()


def test_peft_export_of_a_hub_cache_folder_names_the_hub_id(trained, tiny_bert_dir, tmp_path_factory, tmp_path):
    """A run on a folder of the Hugging Face cache (models--ORG--NAME/snapshots/REVISION) records ORG/NAME."""
    snapshot = tmp_path_factory.mktemp("hub") / "models--acme--tiny-bert" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_bert_dir, snapshot)
    run = trained("lora", model_dir=str(snapshot))
    assert export_cli(run, "peft", tmp_path / "peft").exit_code == 0
    assert peft_base(tmp_path / "peft") == "acme/tiny-bert"


def test_peft_export_can_name_another_copy_of_the_base(trained, tiny_bert_dir, tmp_path):
    """A local folder that is no hub model keeps its path, unless --base-model names another copy; PEFT then loads
    the adapter on that copy with our logits."""
    run = trained("lora")
    assert export_cli(run, "peft", tmp_path / "kept").exit_code == 0
    assert peft_base(tmp_path / "kept") == str(Path(tiny_bert_dir).resolve())
    copy = tmp_path / "elsewhere" / "tiny-bert"
    shutil.copytree(tiny_bert_dir, copy)
    result = export_cli(run, "peft", tmp_path / "peft", "--base-model", str(copy))
    assert result.exit_code == 0, result.stderr
    assert peft_base(tmp_path / "peft") == str(copy)
    tokenizer = rundir.load_run(run)[3]
    with torch.no_grad():
        theirs = peft_model(run, tmp_path / "peft")(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(theirs, our_logits(run), atol=1e-4, rtol=0)


def test_base_model_applies_to_peft_exports_only(trained, tmp_path):
    result = export_cli(trained("lora"), "merged", tmp_path / "merged", "--base-model", "org/name")
    assert result.exit_code == 2 and "--base-model applies to --format peft" in result.stderr
    assert not (tmp_path / "merged").exists()
