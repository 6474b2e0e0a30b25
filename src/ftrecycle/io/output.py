"""Write outputs atomically: a temporary directory beside the destination, renamed at the end."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import numbers
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.dtypes import DType
from ftrecycle.errors import ConfigError, FtRecycleError, OutputError
from ftrecycle.io.safetensors_format import PlannedTensor, build_header

TMP_MARK = ".ftrecycle-tmp-"
#: the largest size --shard-size or --max-memory accept (1 PiB): beyond it a number is a typo
MAX_SIZE = 2**50
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int, *, flag: str = "size") -> int:
    """Parse ``"5GB"``, ``"512MiB"`` or a plain byte count.

    Raises:
        ConfigError: not a finite positive size, or one above ``MAX_SIZE`` (1 PiB).
    """
    if isinstance(text, numbers.Integral) and not isinstance(text, bool | int):
        text = int(text)  # numpy's integers
    if isinstance(text, bool) or not isinstance(text, str | int):
        # a bool is an int to Python, and a float, None or a list from a config file has no .strip()
        raise ConfigError(f"{flag} {text!r:.60} is not a size like 5GB, 512MiB or 1000000")
    if isinstance(text, int):
        if text.bit_length() > 64:  # too long to print (a huge YAML integer): say how long it is
            bits = text.bit_length()
            raise ConfigError(f"{flag} (an integer of {bits} bits) is above the largest size accepted, 1PiB")
        value = text
    else:
        s = text.strip().upper().replace(" ", "")
        num = s.rstrip("KMGTIB")
        unit = s[len(num) :]
        try:
            number = float(num)
            factor = _UNITS[unit]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{flag} {text!r:.80} is not a size like 5GB, 512MiB or 1000000") from e
        if not math.isfinite(number) or number * factor > MAX_SIZE:
            raise ConfigError(f"{flag} {text!r:.80} is not a finite size of at most 1PiB")
        value = int(number * factor)
    if value <= 0:
        raise ConfigError(f"{flag} must be positive, got {text!r:.80}")
    if value > MAX_SIZE:
        raise ConfigError(f"{flag} {text!r:.80} is above the largest size accepted, 1PiB")
    return value


# ---------------------------------------------------------------------------------------------
# Where an output may go. One function, check_output(), owns the output-versus-input rule; every
# command calls it with all of its inputs before it writes anything.

LOCK_MARK = ".ftrecycle-lock"
#: OUT's name is kept as is in the hidden names beside it up to this many bytes; a longer one is
#: shortened and suffixed with a hash, so that a legal 255-byte OUT still gives legal sibling names.
_SIBLING_NAME_BYTES = 180
#: NAME_MAX of Linux file systems: the longest name of one path component, in bytes.
_NAME_MAX = 255
#: Symbolic links looked at inside one input directory (models hold a few dozen files).
_MAX_LINKS_SCANNED = 10_000

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere with -o",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write elsewhere with -o",
    errno.EFBIG: "the file system refuses a file this large: use a smaller --shard-size or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere with -o",
    errno.EACCES: "no permission to write there: fix the permissions or choose another -o",
    errno.EPERM: "the operation is not permitted there: fix the permissions or choose another -o",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use a larger --shard-size",
    errno.ENFILE: "the system ran out of open files: retry later or use a larger --shard-size",
    errno.ENAMETOOLONG: "the name is too long: use a shorter output name",
    errno.EBUSY: "the path is busy (a mount point, or in use): choose another -o",
    errno.ENOTDIR: "a component of the path is a file, not a directory: choose another -o",
    errno.EISDIR: "a directory is in the way: choose another -o",
    errno.EEXIST: "something appeared at that path meanwhile: retry, or choose another -o",
    errno.ENOTEMPTY: "a directory in the way is not empty: choose another -o",
    errno.EXDEV: "the temporary directory and the output are on different file systems: choose another -o",
    errno.EIO: "an I/O error: check the disk",
    errno.ELOOP: "too many levels of symbolic links: choose another -o",
}


def os_error(e: OSError, out: Path) -> OutputError:
    """One :class:`OutputError` for an OS error met while writing ``out``: the path, the cause, the fix."""
    code = errno.errorcode.get(e.errno or 0, "")
    where = f" ({e.filename})" if e.filename is not None and str(e.filename) != str(out) else ""
    hint = _HINTS.get(e.errno or 0, "choose another -o")
    cause = e.strerror or str(e)
    return OutputError(f"cannot write {out}: {cause}{where}{f' [{code}]' if code else ''}; {hint}")


def _is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and not isinstance(e, FtRecycleError) and (e.errno in _HINTS)


def output_path(output: str | Path) -> Path:
    """``output`` as an absolute path whose parent is resolved (symlinks, ``.``, ``..``), its own name kept.

    ``-o .`` and ``-o ..`` become the directories they name, so that their real names are checked.
    """
    p = Path(output).expanduser()
    if p.name in ("", ".", ".."):
        return _real(p)
    return _real(p.absolute().parent) / p.name


def _real(p: Path) -> Path:
    """``p`` with every symbolic link resolved; a link loop is an :class:`OutputError`, not a RuntimeError."""
    try:
        return p.resolve()
    except (OSError, RuntimeError) as e:  # Python < 3.13 raises RuntimeError for a loop
        raise OutputError(f"{p}: cannot resolve the path ({e}); remove the symbolic link loop") from e


def sibling_name(out: Path, tag: str) -> str:
    """A hidden name beside ``out`` (``.OUT{tag}``) that stays within NAME_MAX however long OUT's name is."""
    raw = os.fsencode(out.name)
    if len(raw) > _SIBLING_NAME_BYTES:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        return f".{os.fsdecode(raw[:100])}~{digest}{tag}"
    return f".{out.name}{tag}"


def _identities(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``path`` and of each of its ancestors that exists: catches bind mounts and aliases."""
    ids = set()
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _overlap(o: Path, i: Path) -> str | None:
    """How output ``o`` overlaps input ``i`` (both absolute, resolved), or None."""
    if o == i:
        return "is"
    if i in o.parents:
        return "is inside"
    if o in i.parents:
        return "holds"
    oid, iid = _identity(o), _identity(i)
    if iid is not None and iid in _identities(o):
        return "is" if oid == iid else "is inside"
    if oid is not None and oid in _identities(i):
        return "holds"
    if i.is_dir():
        # a link inside the input that points into the output: replacing the output breaks the input
        for n, (dirpath, dirnames, filenames) in enumerate(os.walk(i)):
            if n > _MAX_LINKS_SCANNED:
                break
            for name in (*dirnames, *filenames):
                p = Path(dirpath) / name
                if p.is_symlink():
                    try:
                        t = p.resolve()
                    except (OSError, RuntimeError):  # a link loop points nowhere, so not into the output
                        continue
                    if t == o or o in t.parents:
                        return f"holds a link ({p}) into"
    return None


def check_no_overlap(out: str | Path, inputs: Iterable[str | Path | None], *, what: str = "output") -> Path:
    """Refuse a path to be written or removed that is, holds, or is inside one of ``inputs``.

    Inputs that do not exist locally (hub ids) are skipped; symbolic links are resolved and
    devices/inodes compared, so no spelling of a path (``-o .``, ``..``, a link, a bind mount)
    gets past it.

    Returns:
        ``out`` as an absolute path (see :func:`output_path`).

    Raises:
        OutputError: naming the output, the input and the fix.
    """
    o = output_path(out)
    real = _real(o)
    for given in inputs:
        if given is None:
            continue
        p = Path(given).expanduser()
        if not os.path.lexists(p):
            continue  # a hub id, or a file another check reports as missing
        i = _real(p)
        how = _overlap(real, i)
        if how is not None:
            raise OutputError(
                f"{what} {out} overlaps input {given} (the {what} {how} the input): writing it would "
                f"overwrite or remove the input; choose another {what} path, outside every input"
            )
    return o


def check_output(out: str | Path, inputs: Iterable[str | Path | None], *, force: bool, what: str = "output") -> Path:
    """The one check of an output path, run before any work: where it is, and what it would replace.

    Refuses an output that is, holds or is inside an input (``force`` or not), the current
    directory or one holding it, a symbolic link, a name longer than the file system allows, a
    path under a regular file, and an existing output without ``force``.

    Args:
        out: the output directory the command will create (or replace, with ``force``).
        inputs: every input of the command: models, deltas, adapters, data and chain files, run dirs.
        force: replace an existing output.
        what: how the message names the output (``output``, ``--out``...).

    Returns:
        The output as an absolute path with its parent resolved.

    Raises:
        OutputError: what is wrong and how to fix it.
    """
    try:
        return _check_output(out, list(inputs), force=force, what=what)
    except OSError as e:  # a path the checks themselves cannot stat
        raise os_error(e, Path(out)) from e


def _check_output(out: str | Path, inputs: list[str | Path | None], *, force: bool, what: str) -> Path:
    given = Path(out).expanduser().absolute()
    for part in given.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise OutputError(
                f"{what} {out}: the name {part[:40]}... is {len(os.fsencode(part))} bytes, the file system "
                f"allows {_NAME_MAX}; use a shorter name"
            )
    for p in given.parents:
        if p.is_symlink() and not p.exists():
            raise OutputError(f"{what} {out}: {p} is a dangling symbolic link; fix it or choose another path")
    o = output_path(out)
    if o.parent == o:
        raise OutputError(f"{what} {out} is the root directory: give a new directory's name")
    anc = o.parent
    while not anc.exists():
        if anc.is_symlink():
            raise OutputError(f"{what} {out}: {anc} is a dangling symbolic link; fix it or choose another path")
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{what} {out}: {anc} is a file, not a directory; choose another path")
    if o.is_symlink():
        target = os.readlink(o)
        raise OutputError(
            f"{what} {out} is a symbolic link (to {target}); ftrecycle writes a new directory there: "
            "give the link's target or another path"
        )
    cwd = Path.cwd().resolve()
    real = _real(o)
    if real == cwd or real in cwd.parents:
        raise OutputError(
            f"{what} {out} is the current directory or holds it: give the name of a new directory to create"
        )
    home = Path.home().resolve()
    if real == home or real in home.parents:
        raise OutputError(f"{what} {out} is the home directory or holds it: give the name of a new directory")
    check_no_overlap(o, inputs, what=what)
    if os.path.lexists(o):
        if not force:
            raise OutputError(f"{what} {out} exists; pass --force to replace it")
        if not o.is_dir():
            raise OutputError(f"{what} {out} exists and is not a directory; remove it or choose another path")
    return o


def check_output_path(out: Path, inputs: list[Path], *, force: bool) -> None:
    """Compatibility name of :func:`check_output`."""
    check_output(out, inputs, force=force)


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse to start a write that cannot fit (with 1% + 64 MiB to spare).

    Raises:
        OutputError: not enough free space.
    """
    free = shutil.disk_usage(directory).free
    want = int(needed * 1.01) + 64 * 2**20
    if free < want:
        raise OutputError(
            f"not enough free space in {directory}: the output needs {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free; free some space or write elsewhere with -o"
        )


# ---------------------------------------------------------------------------------------------
# Locks. A run holds an exclusive flock on ``.OUT.ftrecycle-lock`` beside OUT while it writes OUT,
# and one on ``LOCK_MARK`` inside each temporary directory it made. flock locks die with their
# process (any PID namespace, any host sharing the lock manager), so no PID is ever trusted.

_held: dict[str, list[int]] = {}  # lock path -> [fd, depth]: this process already holds it
_held_guard = threading.Lock()


def _try_lock(path: Path, *, create: bool) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None when another holder has it."""
    while True:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder may have unlinked the file between our open and our lock: retry then
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same or not create:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold the lock of ``out`` (re-entrant within one process); the lock file is removed on release.

    Raises:
        OutputError: another run holds it, or the lock file cannot be made.
    """
    o = output_path(out)
    path = o.parent / sibling_name(o, LOCK_MARK)
    key = str(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            fd = None
        else:
            try:
                fd = _try_lock(path, create=True)
            except OSError as e:
                raise os_error(e, o) from e
            if fd is None:
                raise OutputError(
                    f"another ftrecycle run is writing {out} (it holds {path}); wait for it to finish "
                    "or choose another output"
                )
            _held[key] = [fd, 1]
    try:
        yield o
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd = _held.pop(key)[0]
                with contextlib.suppress(OSError):
                    os.unlink(path)  # while still locked, so no one else holds an unlinked file
                os.close(fd)


def _remove_stale(o: Path) -> None:
    """Remove the temporary directories of earlier runs for ``o`` whose own lock no one holds."""
    prefix = sibling_name(o, TMP_MARK)
    with os.scandir(o.parent) as it:
        entries = [e for e in it if e.name.startswith(prefix)]  # exact prefix: no glob on user names
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue
        path = Path(e.path)
        if e.name.endswith("-old"):  # a replaced output whose removal was interrupted
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            fd = _try_lock(path / LOCK_MARK, create=False)
        except FileNotFoundError:
            # Ours by name, unlocked: its run died between dropping the lock file and the rename.
            # Only a holder of OUT's lock makes these, and that is us now.
            if re.fullmatch(r"[0-9a-f]{16}", e.name[len(prefix) :]):
                shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue  # not removable by us: leave it
        if fd is not None:
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


def _make_parents(directory: Path, out: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return those created, deepest last."""
    missing = []
    p = directory
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for p in reversed(missing):
            os.mkdir(p)
            made.append(p)
    except OSError as e:
        _remove_dirs(made)
        raise os_error(e, out) from e
    return made


def _remove_dirs(made: list[Path]) -> None:
    for p in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(p)  # only if still empty


@contextlib.contextmanager
def _temp_directory(o: Path) -> Iterator[Path]:
    """A fresh hidden directory beside ``o`` with its own lock, removed on exit unless renamed away."""
    # two spare descriptors, released before the clean-up, so that it works after EMFILE too
    spare = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(2)]
    tmp = o.parent / f"{sibling_name(o, TMP_MARK)}{secrets.token_hex(8)}"
    fd: int | None = None
    try:
        os.mkdir(tmp, 0o755)
        fd = _try_lock(tmp / LOCK_MARK, create=True)
        if fd is None:  # cannot happen: the name is new
            raise OutputError(f"cannot lock the temporary directory {tmp}")
        yield tmp
    finally:
        for s in spare:
            os.close(s)
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def scratch_directory(out: str | Path) -> Iterator[Path]:
    """A hidden working directory beside ``out``, always removed at the end (or by a later run for
    ``out`` if this process is killed). Holds ``out``'s lock meanwhile.

    Raises:
        OutputError: the directory cannot be made, or another run writes ``out``.
    """
    o = output_path(out)
    with _guarded(o), _temp_directory(o) as tmp:
        yield tmp


@contextlib.contextmanager
def _guarded(o: Path) -> Iterator[None]:
    """Around a write of ``o``: its missing parents made (and removed again on failure), its lock
    held, stale temporaries of killed runs removed, and an OS error turned into one OutputError."""
    made = _make_parents(o.parent, o)
    ok = False
    try:
        with output_lock(o):
            _remove_stale(o)
            yield
        ok = True
    except BaseException as e:
        if _is_write_error(e):
            raise os_error(e, o) from e  # type: ignore[arg-type]
        raise
    finally:
        if not ok:
            _remove_dirs(made)


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` only if the block succeeds.

    The temporary directory is a hidden sibling of ``out`` (same filesystem, so the final
    rename is atomic), locked while in use. On any exception (SIGTERM and SIGINT arrive as
    KeyboardInterrupt from the command line) it is removed, with the parent directories this
    call created; if the process is killed it stays behind under a hidden name and the next
    run for ``out`` removes it. ``out``'s lock is held throughout: a second writer fails fast.

    Raises:
        OutputError: another run writes ``out``; ``out`` appeared meanwhile (without ``force``);
            or an OS error (full disk, read-only, too many open files...), naming path and cause.
    """
    o = output_path(out)
    parent = o.parent
    with _guarded(o), _temp_directory(o) as tmp:
        yield tmp
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp / LOCK_MARK)  # our lock stays held on the open descriptor
        _umask_modes(tmp)
        _fsync_dir(tmp)
        if os.path.lexists(o):
            if not force:
                raise OutputError(f"output {out} appeared while writing; pass --force to replace it")
            if o.is_symlink() or not o.is_dir():
                raise OutputError(f"output {out} is not a directory; remove it or choose another path")
            trash = parent / f"{sibling_name(o, TMP_MARK)}{secrets.token_hex(8)}-old"
            os.rename(o, trash)
            try:
                os.rename(tmp, o)
            except BaseException:
                os.rename(trash, o)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, o)
        _fsync_dir(parent)


def _umask_modes(tmp: Path) -> None:
    """Give what an output holds the modes the user's umask asks for: writers (transformers'
    ``save_pretrained``, temp files) may leave 0600 files that the user's group could not read."""
    keep = ~process_umask()
    for root, dirs, files in os.walk(tmp):  # never into a link: a link's target is not ours to change
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(path, 0o777 & keep)
            elif stat.S_ISREG(st.st_mode):
                os.chmod(path, (0o666 | (st.st_mode & 0o111)) & keep)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def process_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it to read it, which another
    thread creating a file at that moment would see): from /proc where the kernel reports it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (macOS): the brief set-and-restore is the only portable way
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replaced_file(path: Path) -> Iterator[Any]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` only when complete.

    The content goes to a hidden temp file beside ``path``, renamed over it at the end: a failed
    write leaves the old file (or none) and no temp, and a ``path`` that is a hard link or a
    symbolic link is replaced, never written through.

    Raises:
        OutputError: the OS refused the write (the path, the cause, the fix).
    """
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=TMP_MARK + "file", dir=path.parent)
        os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise os_error(e, path) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    """Write pretty JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@dataclass(frozen=True)
class Slot:
    """Where one tensor's data goes: an open file descriptor and a byte offset."""

    fd: int
    offset: int


class ShardedWriter:
    """Lay tensors out in safetensors shards with Hugging Face names, then accept positioned writes.

    Shards are ``{prefix}-00001-of-0000N.safetensors`` with ``{prefix}.safetensors.index.json``,
    or a single ``{prefix}.safetensors`` when everything fits one shard, as
    ``save_pretrained`` does.
    """

    def __init__(
        self,
        directory: Path,
        tensors: list[tuple[str, DType, tuple[int, ...]]],
        *,
        max_shard_bytes: int,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.prefix = prefix
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for name, dtype, shape in tensors:
            nbytes = PlannedTensor(name, dtype, shape, 0).nbytes
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(PlannedTensor(name, dtype, shape, size))
            size += nbytes
        self.shards = shards
        n = len(shards)
        self.names = (
            [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.metadata = metadata
        self.total_bytes = sum(t.nbytes for s in shards for t in s)
        self._fds: list[int] = []
        self.slots: dict[str, Slot] = {}

    def open(self) -> None:
        """Create the shard files with their headers and full sizes (on failure, none stays open)."""
        try:
            for fname, shard in zip(self.names, self.shards, strict=True):
                header = build_header(shard, self.metadata)
                fd = os.open(self.directory / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                self._fds.append(fd)
                os.write(fd, header)
                data = sum(t.nbytes for t in shard)
                os.ftruncate(fd, len(header) + data)
                for t in shard:
                    self.slots[t.name] = Slot(fd, len(header) + t.begin)
        except BaseException:
            self.close(sync=False, index=False)
            raise

    def close(self, *, sync: bool = True, index: bool = True) -> None:
        """Flush and close the shards, and write the index when there are several.

        Every descriptor is closed even when a flush fails (the first error is raised after).
        """
        fds, self._fds = self._fds, []
        error: BaseException | None = None
        for fd in fds:
            try:
                if sync and error is None:
                    os.fsync(fd)
            except BaseException as e:
                error = e
            finally:
                os.close(fd)
        if error is not None:
            raise error
        if index and len(self.names) > 1:
            weight_map = {t.name: fname for fname, shard in zip(self.names, self.shards, strict=True) for t in shard}
            write_json(
                self.directory / f"{self.prefix}.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
