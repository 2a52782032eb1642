"""The one atomic writer (`files.atomic_path` for a file, `files.atomic_folder` for a folder): a failure leaves neither
a temporary name nor a changed target, a replaced folder is swapped only when the new one is complete, and what is
published has the modes the user's umask gives."""

import os
import stat

import pytest

from adalora_cli import files


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_a_folder_appears_only_when_its_block_succeeds(tmp_path):
    target = tmp_path / "export"
    with files.atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        files.write_json(tmp / "a.json", {"ранг": 4, "名": "значение"})
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert names(tmp_path) == ["export"]
    assert names(target) == ["a.json", "sub"]
    assert files.read_json(target / "a.json") == {"ранг": 4, "名": "значение"}


def test_a_failure_leaves_no_folder_and_no_temporary_name(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_folder(tmp_path / "export") as tmp:
            (tmp / "half.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert names(tmp_path) == []


def test_ctrl_c_inside_the_block_leaves_nothing_either(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_folder(tmp_path / "export") as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert names(tmp_path) == []


def test_missing_parents_are_made_and_removed_again_on_failure(tmp_path):
    target = tmp_path / "new" / "deeper" / "export"
    with pytest.raises(RuntimeError):
        with files.atomic_folder(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("stop")
    assert names(tmp_path) == []
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "mine.txt").write_text("keep")  # a parent that existed before stays, with its files
    with pytest.raises(RuntimeError):
        with files.atomic_folder(target):
            raise RuntimeError("stop")
    assert names(tmp_path / "new") == ["mine.txt"]
    with files.atomic_folder(target) as tmp:
        (tmp / "done").write_text("x")
    assert names(target) == ["done"]


def test_replace_swaps_an_existing_folder_only_when_the_new_one_is_complete(tmp_path):
    target = tmp_path / "tokenizer"
    target.mkdir()
    (target / "old.json").write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_folder(target, replace=True) as tmp:
            (tmp / "new.json").write_text("new")
            assert names(target) == ["old.json"]  # untouched while the new folder is written
            raise RuntimeError("stop")
    assert names(tmp_path) == ["tokenizer"] and names(target) == ["old.json"]
    with files.atomic_folder(target, replace=True) as tmp:
        (tmp / "new.json").write_text("new")
    assert names(tmp_path) == ["tokenizer"] and names(target) == ["new.json"]


def test_the_old_folder_is_put_back_when_the_new_one_cannot_be_renamed(tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.json").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(dst) == os.fspath(target) and ".tmp" in os.fspath(src):
            raise OSError("no space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="no space"):
        with files.atomic_folder(target, replace=True) as tmp:
            (tmp / "new.json").write_text("new")
    assert names(tmp_path) == ["export"] and names(target) == ["old.json"]


def test_an_existing_folder_is_refused_without_replace(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        with files.atomic_folder(target):
            pytest.fail("the block must not run")
    assert names(tmp_path) == ["export"] and names(target) == ["mine.txt"]


def test_published_modes_follow_the_umask(tmp_path, umask_027):
    with files.atomic_folder(tmp_path / "export") as tmp:
        files.write_json(tmp / "a.json", {})
        (tmp / "sub").mkdir()
    files.write_json(tmp_path / "b.json", [])
    assert mode(tmp_path / "export") == 0o750 and mode(tmp_path / "export" / "sub") == 0o750
    assert mode(tmp_path / "export" / "a.json") == 0o640 and mode(tmp_path / "b.json") == 0o640


def test_a_failed_file_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    files.write_json(path, {"accuracy": 0.5})
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("stop")
    assert names(tmp_path) == ["metrics.json"] and files.read_json(path) == {"accuracy": 0.5}
