"""RunConfig: every shipped YAML loads, precedence is defaults < file < --set < options, and unknown keys or
wrong types are errors."""

from pathlib import Path

import pytest

from adalora_cli.config import RunConfig, make_config
from adalora_cli.errors import UserError
from adalora_cli.methods import get_method
from adalora_cli.tasks import get_task

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 9


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_resolves(path):
    cfg = make_config(path)
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        cfg.data_dir = None  # the shared data folder is not beside this checkout
    cfg.validate()
    assert get_task(cfg.task) and get_method(cfg.method)
    method_cfg = cfg.method_config()
    assert cfg.to_dict()[cfg.method] is not None and method_cfg is not None


def test_paper_config_values():
    cfg = make_config(Path(__file__).resolve().parents[1] / "configs/glue/mnli_adalora_deberta-v3-base.yaml")
    m = cfg.method_config()
    assert (cfg.lr, cfg.epochs, cfg.max_seq_length, cfg.budget) == (5e-4, 7, 256, 320_000)
    assert (m.t_init, m.t_final, m.delta_t, m.orth_reg, m.alpha) == (8000, 50000, 100, 0.1, 16)


def test_precedence_file_then_set_then_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: sst2\nlr: 1.0e-3\nbatch_size: 8\nadalora: {t_init: 100, delta_t: 5}\n")
    cfg = make_config(path, ["lr=2e-3", "adalora.t_init=50", "trainer.warmup_steps=10"], {"batch_size": 16, "lr": None})
    assert cfg.lr == 2e-3 and cfg.batch_size == 16
    assert cfg.method_config().t_init == 50 and cfg.method_config().delta_t == 5
    assert cfg.trainer == {"warmup_steps": 10}


@pytest.mark.parametrize("sets, message", [
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["adalora.nonsense=1"], "unknown config key 'adalora.nonsense'"),
    (["batch_size=eight"], "'batch_size' expects int"),
    (["lr=fast"], "'lr' expects float"),
    (["adalora.t_init=-3"], "adalora.t_init must be"),
    (["adalora.beta1=1.5"], "adalora.beta1 must be in"),
    (["budget=0.3X"], "not a parameter count"),
    (["novalue"], "is not key=value"),
])
def test_bad_settings_are_user_errors(sets, message):
    with pytest.raises(UserError, match=message):
        cfg = make_config(None, ["task=sst2"] + sets)
        cfg.validate()


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        make_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        make_config(listing)
    with pytest.raises(UserError, match="does not exist"):
        make_config(tmp_path / "missing.yaml")


def test_the_default_checkpoint_interval_scales_with_the_run():
    """A tenth of the optimizer steps, at least 1 and at most 500: a 300-step run checkpoints every 30 steps (before,
    every 500: a crash lost all of it); --keep-best checkpoints at every evaluation; a given save_steps stays."""
    from adalora_cli.config import default_save_steps

    assert [default_save_steps(n) for n in (1, 6, 16, 300, 4999, 5000, 100_000)] == [1, 1, 2, 30, 500, 500, 500]
    cfg = RunConfig(task="sst2", epochs=3, batch_size=32, gradient_accumulation_steps=2)
    # 67,349 SST-2 rows: 2,105 batches of 32 (the last one short), 1,053 optimizer steps per epoch, 3,159 in all
    assert cfg.optimizer_steps(67_349) == 3_159
    assert cfg.optimizer_steps(67_349, processes=4) == 3 * 264  # 527 batches per process, 264 steps each epoch
    cfg.resolve_save_steps(67_349)
    assert cfg.save_steps == 316
    assert RunConfig(task="sst2", max_steps=300).optimizer_steps(10) == 300
    best = RunConfig(task="sst2", max_steps=300, eval_every="25", keep_best=True)
    best.resolve_save_steps(1000)
    assert best.save_steps == 25
    given = RunConfig(task="sst2", max_steps=300, save_steps=7)
    given.resolve_save_steps(1000)
    assert given.save_steps == 7


def test_resume_puts_the_given_settings_over_the_run_s_saved_ones(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("task: sst2\nlr: 0.5\nbatch_size: 8\nseed: 3\nadalora:\n  t_init: 5\n"
                                     "  t_final: 7\n", encoding="utf-8")
    given = tmp_path / "given.yaml"
    given.write_text("seed: 4\n", encoding="utf-8")
    cfg = make_config(given, ["adalora.t_final=9"], {"output_dir": str(out), "batch_size": 16, "lr": None},
                      resume=True)
    assert (cfg.task, cfg.lr, cfg.batch_size, cfg.seed) == ("sst2", 0.5, 16, 4)
    assert cfg.method_args["adalora"] == {"t_init": 5, "t_final": 9}
    fresh = make_config(None, ["task=sst2"], {"output_dir": str(out)})
    assert (fresh.lr, fresh.batch_size, fresh.method_args) == (None, 32, {})


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_config(None, ["task=sst2"], {"output_dir": str(tmp_path / "none")}, resume=True)
    with pytest.raises(UserError, match="holds no config.yaml"):
        make_config(None, ["task=sst2"], {"output_dir": str(tmp_path)}, resume=True)
