"""User errors end in one line on stderr with exit code 2, no traceback, nothing written."""

import dataclasses
import re
import subprocess
import sys
import typing

import pytest
import typer.main
from typer.testing import CliRunner

from adalora_cli.cli import COLUMNS, OneLineErrors, PlainHelp, app
from adalora_cli.config import RunConfig
from adalora_cli.options import with_field_options
from adalora_cli.rundata import COLUMN_OPTIONS

runner = CliRunner()


def run_cli(args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, fragment, created=None):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adalora: error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if created is not None:
        assert not created.exists(), f"{created} was written"


def train_args(glue_dir, out, **overrides):
    options = {"--task": "sst2", "--method": "adalora", "--budget": "0.3M", "--model": "minilm-l6",
               "--data-dir": glue_dir, "--output-dir": out, "--max-steps": 2}
    options.update(overrides)
    args = ["train"]
    for key, value in options.items():
        if value is not None:
            args += [key, value]
    return args


@pytest.mark.parametrize("overrides, fragment", [
    ({"--task": "nope"}, "unknown task 'nope'"),
    ({"--method": "nope"}, "unknown method 'nope'"),
    ({"--budget": "0.3X"}, "not a parameter count"),
    ({"--budget": "-5"}, "not a parameter count"),
    ({"--budget": "0"}, "must be a positive parameter count"),
    ({"--budget": "20k"}, "below one rank per adapted matrix"),
    ({"--method": "lora", "--budget": "1k"}, "below one rank per adapted matrix"),
    ({"--data-dir": "/nonexistent/glue"}, "data directory /nonexistent/glue does not exist"),
    ({"--task": "qqp"}, "train file"),
    ({"--model": "/nonexistent/model"}, "cannot load model"),
    ({"--batch-size": "0"}, "batch_size must be at least 1"),
])
def test_train_user_errors(glue_dir, tmp_path, overrides, fragment):
    out = tmp_path / "run"
    assert_clean_failure(run_cli(train_args(glue_dir, out, **overrides)), fragment, created=out)


def test_non_empty_output_dir_needs_overwrite(glue_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_failure(run_cli(train_args(glue_dir, out)), "pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_dev_file(glue_dir, tmp_path):
    task_dir = tmp_path / "SST-2"
    task_dir.mkdir()
    (task_dir / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    out = tmp_path / "run"
    assert_clean_failure(run_cli(train_args(tmp_path, out)), "validation file", created=out)


def test_eval_on_a_folder_that_is_not_a_run(tmp_path):
    assert_clean_failure(run_cli(["eval", tmp_path]), "is not a run directory")
    assert_clean_failure(run_cli(["eval", tmp_path / "missing"]), "does not exist")


def test_help_lists_commands_and_imports_no_torch():
    code = "import sys; from adalora_cli.cli import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = run_cli(["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "methods", "tasks"):
        assert command in result.stdout


def test_real_process_prints_one_line_and_exits_2(glue_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adalora_cli", "train", "--task", "sst2", "--budget", "0.3X",
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["adalora: error: budget '0.3X' is not a parameter count; "
                                                "write e.g. 300000, 300k or 0.3M"]


# -- the options generated from the settings' dataclass fields ------------------------------------------------------
HAND_WRITTEN = {"config", "set_", "overwrite", "resume", "help"}  # train's options that are not settings


def command_params(command: str) -> dict:
    return {param.name: param for param in typer.main.get_command(app).commands[command].params}


def run_settings() -> list[dataclasses.Field]:
    """RunConfig's user settings: not internal, not a section (method_args, trainer)."""
    return [f for f in dataclasses.fields(RunConfig) if not f.metadata.get("internal") and f.name != "trainer"]


def task_settings() -> dict[str, dataclasses.Field]:
    """Every task family's settings, by name (a name shared by several families is one option)."""
    from adalora_cli.tasks import settings_classes

    return {f.name: f for cls in reversed(settings_classes()) for f in dataclasses.fields(cls)}


def squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)  # help lines wrap anywhere, also inside a hyphenated word


def test_every_run_setting_is_a_train_option_with_its_help_and_default():
    params = command_params("train")
    help_text = squeezed(run_cli(["train", "--help"]).stdout)
    for f in run_settings():
        name = "--" + f.name.replace("_", "-")
        param = params.get(f.name)
        assert param is not None and param.opts == [name], f"{f.name} is not the option {name}"
        assert param.default is None, f"{name} must default to None (not given), not {param.default!r}"
        default = getattr(RunConfig(), f.name)
        shown = f.metadata.get("shown", "none" if default is None else str(default))
        assert squeezed(f"{f.metadata['help']}  [default: {shown}]") in help_text, f"{name}: help or default"
        if isinstance(default, bool):
            assert param.secondary_opts == ["--no-" + name[2:]], name


def test_every_task_setting_is_a_train_option_with_its_help():
    """The task families' settings (`Task.settings_class`) are declared once, there: `train` generates them."""
    params = command_params("train")
    help_text = squeezed(run_cli(["train", "--help"]).stdout)
    assert task_settings(), "no task settings found"
    for name, f in task_settings().items():
        param = params.get(name)
        assert param is not None and param.opts == ["--" + name.replace("_", "-")], name
        assert param.default is None, name
        assert squeezed(f.metadata["help"]) in help_text, name


def test_every_task_setting_option_reaches_its_task(monkeypatch):
    """Given on the command line, each family's settings land in the run's task section, typed."""
    from adalora_cli.tasks import available_tasks, get_task

    params = command_params("train")
    first_task = {}
    for name in available_tasks():
        first_task.setdefault(get_task(name).settings_class, name)
    for cls, task in first_task.items():
        hints = typing.get_type_hints(cls)
        args, expected = ["--task", task], {}
        for f in dataclasses.fields(cls):
            text, value = sample(params[f.name], hints[f.name])
            args += [params[f.name].opts[0]] + ([] if text is None else [text])
            expected[f.name] = value
        settings = captured_config(monkeypatch, args).task_config()
        assert {name: getattr(settings, name) for name in expected} == expected, task


def test_train_help_shows_the_run_config_defaults():
    text = squeezed(run_cli(["train", "--help"]).stdout)
    for fragment in ("--batch-size<int>Examplesperdevicepermicro-batch.[default:32]", "--epochs<float>",
                     "--lr<float>Peaklearningrate.[default:themethod's]", "--warmup-ratio<float>",
                     "[default:0.06]", "--keep-best/--no-keep-best", "--budget<str>"):
        assert fragment in text, fragment


def sample(param, field_type):
    """A command-line value for an option, and the value the config must then hold."""
    if param.is_flag:
        return None, True
    if param.name == "budget":
        return "300k", 300000
    kind = [a for a in typing.get_args(field_type) if a is not type(None)] or [field_type]
    if typing.get_origin(kind[0]) is list:
        return "x-value", ["x-value"]
    return {int: ("7", 7), float: ("0.25", 0.25), str: ("x-value", "x-value")}[kind[0]]


def captured_config(monkeypatch, args) -> RunConfig:
    import adalora_cli.pipeline

    seen = []
    monkeypatch.setattr(adalora_cli.pipeline, "run_train", lambda cfg, **kw: seen.append(cfg))
    result = run_cli(["train", *args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return seen[0]


def test_every_train_option_sets_its_config_key(monkeypatch):
    """Every generated option lands on the config key of its name, with its type; a flag's --no- form too."""
    hints = typing.get_type_hints(RunConfig)
    params = {k: p for k, p in command_params("train").items() if k not in HAND_WRITTEN and k not in task_settings()}
    assert set(params) <= set(hints), set(params) - set(hints)
    args, expected = [], {}
    for name, param in params.items():
        text, value = sample(param, hints[name])
        args += [param.opts[0]] + ([] if text is None else [text])
        expected[name] = value
    cfg = captured_config(monkeypatch, args)
    assert {name: getattr(cfg, name) for name in expected} == expected
    flags = [param for param in params.values() if param.is_flag]
    cfg = captured_config(monkeypatch, [p.secondary_opts[0] for p in flags] +
                          [item for p in flags for item in ("--set", f"{p.name}=true")])
    assert all(getattr(cfg, p.name) is False for p in flags)


def test_an_option_not_given_leaves_the_settings_below_it(monkeypatch):
    """None means "not given": --set (or the config file) stands unless the option itself is given."""
    params = {k: p for k, p in command_params("train").items() if k not in HAND_WRITTEN and k not in task_settings()}
    hints = typing.get_type_hints(RunConfig)
    sets, expected = [], {}
    for name, param in params.items():
        text, value = sample(param, hints[name])
        sets += ["--set", f"{name}={'true' if text is None else text}"]
        expected[name] = value
    cfg = captured_config(monkeypatch, sets)
    assert {name: getattr(cfg, name) for name in expected} == expected


def test_eval_and_predict_declare_the_same_column_options(monkeypatch):
    import adalora_cli.commands

    eval_columns = {k: p for k, p in command_params("eval").items() if p.rich_help_panel == COLUMNS}
    predict_columns = {k: p for k, p in command_params("predict").items() if p.rich_help_panel == COLUMNS}
    assert set(eval_columns) == set(predict_columns) == set(COLUMN_OPTIONS)
    assert all(eval_columns[k].help == predict_columns[k].help for k in eval_columns)
    seen = []
    monkeypatch.setattr(adalora_cli.commands, "run_predict", lambda *a, columns: seen.append(columns))
    result = run_cli(["predict", "run", "--input", "rows.csv", "--text-column", "Текст", "--label-column", "标签"])
    assert result.exit_code == 0, result.stderr
    assert seen == [{**dict.fromkeys(COLUMN_OPTIONS), "text_column": "Текст", "label_column": "标签"}]


@dataclasses.dataclass
class _Shared:
    text_column: str | None = dataclasses.field(default=None, metadata={"help": "First help.", "panel": "Data"})
    names: list[str] | None = dataclasses.field(default=None, metadata={"help": "Class names (repeatable)."})
    limit: int = dataclasses.field(default=5, metadata={"help": "A limit.", "shown": "the task's"})
    extra: dict = dataclasses.field(default_factory=dict)  # a section: not an option
    filled: int = dataclasses.field(default=0, metadata={"internal": True})


@dataclasses.dataclass
class _Other:
    text_column: str | None = dataclasses.field(default=None, metadata={"help": "Second help."})
    flag: bool = dataclasses.field(default=True, metadata={"help": "A flag."})


def _toy_command(*classes):
    toy = typer.Typer(cls=OneLineErrors, rich_markup_mode=None)
    seen = []

    @toy.command(cls=PlainHelp)
    @with_field_options(classes)
    def go(**options):
        seen.append(options)

    @toy.command()
    def other():
        """A second command, so that `go` is a sub-command as in adalora."""

    return toy, seen


def test_generator_declares_a_shared_setting_once_and_reads_lists_and_flags():
    toy, seen = _toy_command(_Shared, _Other)
    result = runner.invoke(toy, ["go", "--text-column", "t", "--names", "a,b", "--names", "c", "--no-flag"])
    assert result.exit_code == 0, result.stderr
    assert seen == [{"text_column": "t", "names": ["a,b", "c"], "limit": None, "flag": False}]
    text = runner.invoke(toy, ["go", "--help"]).stdout
    assert "First help." in text and "Second help." not in text and "[default: the task's]" in text
    assert "--extra" not in text and "--filled" not in text and "[default: True]" in text


def test_generator_refuses_a_setting_without_help():
    @dataclasses.dataclass
    class Undocumented:
        size: int = 3

    with pytest.raises(TypeError, match="Undocumented.size"):
        _toy_command(Undocumented)


# -- command-line mistakes: one line, exit 2 -------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["train", "--bugdet", "4k"], "No such option: --bugdet"),
    (["train", "--max-steps", "many"], "Invalid value for '--max-steps'"),
    (["eval", "run", "--rank", "two"], "Invalid value for '--rank'"),
    (["trian"], "No such command 'trian'"),
])
def test_command_line_mistakes_are_one_line(args, fragment):
    assert_clean_failure(run_cli(args), fragment)


def test_no_arguments_print_the_help():
    result = run_cli([])
    assert "Usage:" in result.output and "train" in result.output
    assert "adalora: error" not in result.output
