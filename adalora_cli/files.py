"""Files at the bottom of the import graph: the one atomic writer, JSON and safetensors I/O, and the run lock.

Every file the tool writes goes to a temporary name beside its target and is renamed when complete
(`atomic_path`), and every folder it writes whole (a tokenizer, an export) is built in a temporary folder beside
its target and renamed into place (`atomic_folder`): a crash, an error or Ctrl-C never leaves a half-written file
or folder. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

from adalora_cli.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed when it fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: Path, replace: bool = False):
    """A temporary folder beside `path`, renamed onto it when the block succeeds and removed when it fails.

    Missing parent folders are made, and removed again when the block fails. An existing `path` is refused
    (FileExistsError) unless `replace`; then it is swapped out only once the new folder is complete, and put back if
    the new one cannot be renamed into place. The folder gets the mode `mkdir` gives under the user's umask (a
    temporary folder is made private); what the block writes inside keeps the modes it was written with.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    made = _make_parents(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~current_umask())
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        for folder in reversed(made):
            _remove_if_empty(folder)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` onto `path`; an existing `path` is moved aside first and removed after, or put back on failure."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _make_parents(folder: Path) -> list[Path]:
    """Make `folder` and its missing ancestors; return those made, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}); the run folder is damaged, re-run training") from None


def save_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> dict[str, Any]:
    """Tensors of a safetensors file; a missing, truncated or corrupt file is a UserError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; the run did not finish or the folder was damaged: re-run training")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise UserError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]}); re-run training or re-export") from None


LOCK = ".adalora.lock"


class RunLock:
    """An exclusive lock on a run directory, held by the one process that writes it.

    It is an advisory `flock` on `OUT/.adalora.lock`: the kernel drops it when the process ends, however it
    ends, so a run killed by SIGKILL or a lost machine leaves no stale lock behind. The file itself stays
    (deleting it would let two processes lock two different files of the same name) and says who holds it.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def holder(self) -> str | None:
        """Who holds the lock now (as its file says), or None when nobody does. Creates and changes nothing."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        finally:
            os.close(fd)  # also drops the shared lock taken above

    def check(self) -> None:
        """Fail with a UserError when another process holds the lock."""
        holder = self.holder()
        if holder is not None:
            raise self._busy(holder)

    def acquire(self) -> "RunLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise self._busy(holder) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"adalora train (pid {os.getpid()} on {socket.gethostname()}, started {started})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def _busy(self, holder: str) -> UserError:
        return UserError(f"output directory {self.folder} is being written by {holder}; wait for that run to end "
                         "(or stop it) before starting another there, or choose another --output-dir")
