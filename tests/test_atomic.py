"""flexlora._atomic.move_into: the outputs of a run go into a folder all together or not at all."""

import os
import stat

import pytest

from flexlora._atomic import move_into

NAMES = ("adapter", "metrics.json", "log.csv", "heatmap.png")


def _tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _old_and_new(tmp_path):
    target, stage = tmp_path / "out", tmp_path / "out" / ".stage"
    (target / "adapter").mkdir(parents=True)
    (target / "adapter" / "w.bin").write_bytes(b"old weights")
    (target / "metrics.json").write_text("old metrics")
    (target / "heatmap.png").write_bytes(b"old plot")  # this run writes no heatmap: stale
    (target / "notes.txt").write_text("the user's")  # not one of ours: never touched
    stage.mkdir()
    (stage / "adapter").mkdir()
    (stage / "adapter" / "w.bin").write_bytes(b"new weights")
    (stage / "metrics.json").write_text("new metrics")
    (stage / "log.csv").write_text("new log")
    return target, stage


def test_moves_new_entries_in_and_stale_ones_out(tmp_path):
    target, stage = _old_and_new(tmp_path)
    os.chmod(target / "metrics.json", 0o640)
    move_into(stage, target, NAMES)
    assert {k: v for k, v in _tree(target).items() if not k.startswith(".stage")} == {
        "adapter": None, "adapter/w.bin": b"new weights", "log.csv": b"new log",
        "metrics.json": b"new metrics", "notes.txt": b"the user's",
    }
    assert stat.S_IMODE(os.stat(target / "metrics.json").st_mode) == 0o640  # the replaced file's mode
    # the previous entries wait in the stage for the caller to delete
    assert _tree(stage / ".previous") == {"adapter": None, "adapter/w.bin": b"old weights",
                                          "heatmap.png": b"old plot", "metrics.json": b"old metrics"}


@pytest.mark.parametrize("fail_at", range(6))  # 3 renames aside + 3 renames in
def test_a_failed_rename_undoes_every_rename(tmp_path, monkeypatch, fail_at):
    target, stage = _old_and_new(tmp_path)
    before_target = {k: v for k, v in _tree(target).items() if not k.startswith(".stage")}
    before_stage = _tree(stage)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == fail_at + 1:
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        move_into(stage, target, NAMES)
    monkeypatch.setattr(os, "rename", real_rename)
    assert {k: v for k, v in _tree(target).items() if not k.startswith(".stage")} == before_target
    assert {k: v for k, v in _tree(stage).items() if not k.startswith(".previous")} == before_stage
    assert not any((stage / ".previous").iterdir())


def test_into_an_empty_folder(tmp_path):
    stage = tmp_path / ".stage"
    stage.mkdir()
    (stage / "metrics.json").write_text("{}")
    move_into(stage, tmp_path, NAMES)
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert stat.S_IMODE(os.stat(tmp_path / "metrics.json").st_mode) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
