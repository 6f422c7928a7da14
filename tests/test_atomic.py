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


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("undo", [False, True], ids=["commit", "undo"])
def test_replace_directory_commits_or_puts_the_previous_contents_back(tmp_path, monkeypatch, exchange, undo):
    import flexlora._atomic as atomic
    from flexlora._atomic import replace_directory

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real, source = tmp_path / "disk" / "adapter", tmp_path / "stage"
    (real / "sub").mkdir(parents=True)
    (real / "w.bin").write_bytes(b"old")
    (real / "sub" / "x").write_bytes(b"old x")
    os.chmod(real / "w.bin", 0o644)
    source.mkdir()
    (source / "w.bin").write_bytes(b"new")
    os.chmod(source / "w.bin", 0o600)  # safetensors writes 0600: the new file takes the old one's mode
    (source / "cfg.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    old_tree = _tree(real)
    finish = replace_directory(link, source)
    assert _tree(real) == {"cfg.json": b"{}", "w.bin": b"new"}  # replaced whole
    assert stat.S_IMODE(os.stat(real / "w.bin").st_mode) == 0o644
    finish(undo)
    assert _tree(real) == (old_tree if undo else {"cfg.json": b"{}", "w.bin": b"new"})
    assert link.is_symlink() and sorted(p.name for p in real.parent.iterdir()) == ["adapter"]  # nothing left over
