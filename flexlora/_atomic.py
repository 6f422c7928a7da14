"""Write a whole directory so that a failed save never destroys the previous one.

Every file is written into a fresh temporary directory beside the target (same filesystem, so
renames are atomic), fsynced, and only then swapped in place of the target. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)`` call, atomic even against a crash; elsewhere it is two renames
(target -> backup, temp -> target) with the backup renamed back if the second one fails, so only a
process kill in the microseconds between them can leave the target missing (the backup, a hidden
``.<name>.old-*`` sibling, then still holds the previous save).

:func:`move_into` does the same for a set of entries of a folder that also holds other files
(``flexlora train``'s outputs): all of them are renamed in together, or none.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Tuple

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_mode(tmp, target) -> None:
    """Give ``tmp`` (made by tempfile: 0700 for a folder, 0600 for a file) the permissions of the
    ``target`` it will replace, or where there is none those a plain mkdir / open would give under
    the umask, so a save stays readable by whoever could read the previous one."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = (0o777 if os.path.isdir(tmp) else 0o666) & ~_umask()
    os.chmod(tmp, mode)


def replace_file(path, data, newline=None) -> None:
    """Write ``data`` (str or bytes) to a temporary file beside ``path``, then rename it onto
    ``path``: a failed write (disk full, an exception) leaves any previous file whole, and no
    temporary file behind. ``newline`` is passed to ``open`` for str data."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=os.path.dirname(os.path.abspath(path)))
    try:
        match_mode(tmp, path)
        mode, text_args = ("wb", {}) if isinstance(data, bytes) else ("w", {"newline": newline})
        with os.fdopen(fd, mode, **text_args) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash must not leave an empty file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: best effort, not every OS allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False when unsupported."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _check_target(target: Path, conflicts: Iterable[Tuple[str, str]] = (), in_place: bool = False) -> None:
    cwd = Path.cwd().resolve()
    real = target.resolve()  # through symlinked folders above it: the folder a save replaces
    if real == cwd or real in cwd.parents:
        raise ValueError(
            f"cannot save to {str(target)!r}: it is (or contains) the current working directory, which a "
            "save replaces as a whole; give a dedicated subfolder"
        )
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save to {str(target)!r}: it exists and is not a directory")
    for name, owner in conflicts:
        if (target / name).exists():
            raise FileExistsError(
                f"cannot save to {str(target)!r}: it holds {name} ({owner}), whose weights file has the same "
                "name as this save's; give another folder"
            )
    if in_place:  # a mount point: the save writes inside it only (its parent may be read-only)
        if not os.access(target, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot save to {str(target)!r}: the directory is not writable")
        return
    # the nearest existing folder above the target: the one the save creates its folders in
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(f"cannot save to {str(target)!r}: {str(parent)!r} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save to {str(target)!r}: directory {str(parent)!r} is not writable")


@contextlib.contextmanager
def atomic_directory(target, owned_files: Iterable[str], conflicts: Iterable[Tuple[str, str]] = ()) -> Iterator[Path]:
    """Context manager yielding a temporary directory to fill; on normal exit it replaces ``target``.

    Files of an existing ``target`` whose names are not in ``owned_files`` (a user's notes, a plot)
    are carried over into the new directory; the owned ones are replaced or dropped. On an
    exception inside the block the temporary directory is removed and ``target`` is untouched.
    ``conflicts``: (file name, what writes it) pairs; an existing ``target`` holding one is
    refused (FileExistsError) before anything is written (another format's folder).
    """
    target = Path(target).absolute()
    if target.is_symlink():  # replace the folder the link points to, keep the link
        target = target.resolve()
    owned = set(owned_files)
    # A mount point (a container volume) cannot be renamed away, and a folder beside it is on
    # another filesystem: the new files are staged inside it and renamed in, all or none.
    in_place = target.is_dir() and os.path.ismount(target)
    _check_target(target, conflicts, in_place)
    try:
        if not in_place:
            target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _stage(target, in_place)
    except OSError as e:
        raise OSError(f"cannot save to {str(target)!r}: {e.strerror or e}") from e
    try:
        yield tmp
        finish = _commit(tmp, target, owned, in_place)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish(False)


def _stage(target: Path, in_place: bool) -> Path:
    """A fresh hidden folder to fill with a new ``target``: beside it (same filesystem, so a
    rename swaps them), or inside it where ``target`` is a mount point, with target's mode."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target if in_place else target.parent))
    match_mode(tmp, target)
    return tmp


def _commit(tmp: Path, target: Path, owned, in_place: bool) -> Callable[[bool], None]:
    """Put the staged folder ``tmp`` in place of ``target``: each owned file gets the mode of the
    one it replaces (some writers, safetensors, create 0600 files); entries of ``target`` not
    owned are carried over; everything is fsynced, then swapped in (in place: the owned entries
    renamed in, all or none). Returns ``finish(undo)``, to call once: True puts the previous
    contents back, False deletes them."""
    for name in owned:
        if (tmp / name).is_file() and not (tmp / name).is_symlink():
            match_mode(tmp / name, target / name)
    if in_place:
        undo_move = move_into(tmp, target, sorted(owned))  # fsyncs the new files and target

        def finish_in_place(undo: bool) -> None:
            if undo:
                undo_move()
            shutil.rmtree(tmp, ignore_errors=True)  # the previous files (or, undone, the new ones)

        return finish_in_place
    if target.is_dir():
        for entry in target.iterdir():
            if entry.name in owned or (tmp / entry.name).exists():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, tmp / entry.name, symlinks=True)
            else:
                try:
                    os.link(entry, tmp / entry.name)
                except OSError:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
    for f in [*tmp.rglob("*"), tmp]:
        if f.is_dir() or (f.is_file() and not f.is_symlink()):
            _fsync_path(f)
    previous = swap_directory(tmp, target)

    def finish(undo: bool) -> None:
        if undo and previous is not None:
            shutil.rmtree(swap_directory(previous, target), ignore_errors=True)  # the new contents
        elif previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    return finish


def swap_directory(new: Path, target: Path):
    """Put folder ``new`` (a sibling of ``target``) in ``target``'s place, atomically where the OS
    can (see the module docstring). Returns the path that now holds ``target``'s previous
    contents (for the caller to delete, or to swap back), or None where there was no target."""
    if target.is_dir() and _exchange(new, target):
        previous = new  # the exchange left the previous contents under new's name
    elif target.is_dir():
        previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(previous)
        os.rename(target, previous)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(previous, target)
            raise
    else:
        os.rename(new, target)
        previous = None
    _fsync_path(target.parent)
    return previous


def move_into(stage, target, names: Iterable[str]) -> Callable[[], None]:
    """Move the entries ``names`` of folder ``stage`` into folder ``target`` (same filesystem),
    replacing the entries of those names there; a name ``stage`` lacks is removed from ``target``
    (a stale output of an earlier run must not pass for this run's).

    All or nothing: the previous entries are first renamed aside into ``stage/.previous`` and the
    new ones then renamed in; should any rename fail, every rename done is undone, so ``target``
    holds either all the old entries or all the new ones. The old ones are deleted with ``stage``
    by the caller. Each new entry gets the permissions of the one it replaces (see match_mode).
    Returns a function that undoes the move (puts the old entries back), valid until ``stage``
    is deleted: for a caller that commits something else after it and must roll back both.
    """
    stage, target = Path(stage), Path(target)
    names = list(dict.fromkeys(names))
    aside = stage / ".previous"
    aside.mkdir()
    for name in names:
        if os.path.lexists(stage / name) and not (stage / name).is_symlink():
            match_mode(stage / name, target / name)
            # on disk before the renames: a crash right after must not leave empty files in place
            for f in [stage / name, *(stage / name).rglob("*")] if (stage / name).is_dir() else [stage / name]:
                if f.is_file():
                    _fsync_path(f)
    done = []  # (source, destination) of every rename made, to undo them
    try:
        for name in names:
            if os.path.lexists(target / name):
                os.rename(target / name, aside / name)
                done.append((target / name, aside / name))
        for name in names:
            if os.path.lexists(stage / name):
                os.rename(stage / name, target / name)
                done.append((stage / name, target / name))
    except BaseException:
        for src, dst in reversed(done):
            os.rename(dst, src)
        raise
    _fsync_path(target)

    def undo() -> None:
        for src, dst in reversed(done):
            os.rename(dst, src)
        _fsync_path(target)

    return undo


def replace_directory(target, source) -> Callable[[bool], None]:
    """Replace the folder ``target`` (through a symlink: the folder it points to, the link kept)
    whole by a copy of folder ``source``, as :func:`atomic_directory` would, but undoably: returns
    ``finish(undo)``, to call once: True puts the previous contents back, False deletes them. For
    a caller that commits something else after this and must roll back both together."""
    real = Path(target).resolve()
    source = Path(source)
    owned = {p.name for p in real.iterdir()} | {p.name for p in source.iterdir()}  # replaced whole
    in_place = os.path.ismount(real)  # see atomic_directory
    tmp = _stage(real, in_place)
    try:
        for entry in source.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, tmp / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        return _commit(tmp, real, owned, in_place)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
