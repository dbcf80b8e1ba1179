"""Atomic, safe outputs: a result is either complete or absent, never half-written.

Files are written to a temporary sibling and renamed over the target; run directories are built in a
temporary sibling directory (``.NAME.tmp-XXXX``) and renamed into place when complete.

Every output directory simspec writes (run, sweep, report, validation, ...) holds a marker file
:data:`MARKER` (``.simspec-output``: JSON with ``kind`` and ``simspec_version``); ``--force``
replaces only a directory that holds one, so a typo in ``--out`` can never delete a user's file
or folder. :func:`check_output_dir` and :func:`check_output_file` check an output location (and
that it is writable) *before* any work is done. Files and directories are created with the
permissions the umask allows (``tempfile`` alone would give 0600 files and 0700 directories).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from simspec.errors import SimspecError


MARKER = ".simspec-output"
MAX_ECHO_CHARS = 80


def current_umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new regular file under the current umask (0o644 under the usual 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new directory under the current umask (0o755 under the usual 022)."""
    return 0o777 & ~current_umask()


def marker_doc(kind: str) -> dict[str, Any]:
    from simspec import __version__

    return {"kind": kind, "simspec_version": __version__}


def write_marker(directory: str | os.PathLike, kind: str) -> None:
    """Write the :data:`MARKER` file saying ``directory`` is a simspec output of ``kind``."""
    write_text(Path(directory) / MARKER, dumps_json(marker_doc(kind)))


def read_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of ``directory`` (``{"kind", "simspec_version"}``), or None if it has none."""
    p = Path(directory) / MARKER
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("kind"), str) else None


def clip(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters (``…`` and the full length appended), for
    echoing user data in a one-line error without echoing megabytes."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_dir(parent: Path, what: str, target: Path) -> None:
    """``parent`` (created later if missing) can receive new entries; else one-line SimspecError."""
    anc = _nearest_existing(parent)
    if not anc.is_dir():
        raise SimspecError(f"{what} {target}: cannot be created ({anc} is not a directory)")
    try:  # os.access is wrong for root and for read-only mounts: try it
        fd, probe = tempfile.mkstemp(prefix=".simspec-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SimspecError(f"{what} {target}: not writable ({exc.strerror or exc} in {anc})") from None


def _refuse_special(final: Path, what: str) -> None:
    try:
        resolved = final.resolve()
    except OSError as exc:
        raise SimspecError(f"{what} {final}: cannot resolve ({exc.strerror or exc})") from None
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path(resolved.anchor) or resolved == Path.home():
        raise SimspecError(f"{what} {final}: refusing to write over the current, a parent, the home or the "
                           f"root directory; name a new directory")


def check_output_dir(final: str | os.PathLike, kind: str, *, force: bool = False, what: str = "--out",
                     resume: bool = False) -> Path:
    """Check, before any work, that ``final`` can become a simspec output directory of ``kind``.

    Refused (one line, :class:`SimspecError`): a path that exists and is not a directory (a file,
    ``/dev/null``, a socket); the current directory or one of its parents; an existing directory
    without ``force`` (unless ``resume`` and it is an output of the same ``kind``, or empty); with
    ``force``, an existing directory that holds no simspec :data:`MARKER` or the marker of another
    kind (a report never replaces a run); a location that cannot be written. Nothing is created
    or deleted here.
    """
    final = Path(final)
    if final.exists() or final.is_symlink():
        if not final.is_dir() or final.is_symlink():
            raise SimspecError(f"{what} {final}: exists and is not a directory; simspec replaces only "
                               f"directories it wrote (choose another path)")
        _refuse_special(final, what)
        marker = read_marker(final)
        if resume:
            if marker is not None and marker["kind"] == kind:
                pass
            elif marker is None and not any(final.iterdir()):
                pass
            elif marker is None and kind == "sweep" and ((final / "sweep.json").is_file() or (
                    final / "runs").is_dir() or (final / ".sweep.lock").is_file()):
                pass  # a sweep written (or killed) before markers existed
            else:
                found = f"a simspec {marker['kind']} output" if marker else "not a simspec output"
                raise SimspecError(f"{what} {final}: exists and is {found}, not a {kind} directory; "
                                   f"choose a new directory")
        elif not force:
            raise SimspecError(f"{what} {final}: already exists (use --force to replace it)")
        elif marker is None:
            raise SimspecError(f"{what} {final}: exists and is not a simspec output (no {MARKER} file); "
                               f"--force replaces only directories simspec wrote: remove it yourself or "
                               f"choose another path")
        elif marker["kind"] != kind and kind != "output":
            raise SimspecError(f"{what} {final}: is a simspec {marker['kind']} output, not a {kind}; --force "
                               f"replaces only an output of the same kind (choose another path)")
        _check_writable_dir(final.parent, what, final)
        if resume:
            _check_writable_dir(final, what, final)
    else:
        _refuse_special(final, what)
        _check_writable_dir(final.parent, what, final)
    return final


def is_simspec_json(path: Path) -> bool:
    """A JSON file written by simspec: a ``simspec_output`` marker key, or a simspec profile."""
    try:
        if path.stat().st_size > 256 << 20:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(doc, dict):
        return False
    # a profile (its schema names it); a capacity.json written before the marker key existed
    return (isinstance(doc.get("simspec_output"), dict) or doc.get("schema") == "simspec-profile"
            or {"search", "results", "slo", "trace"} <= set(doc))


def check_output_file(final: str | os.PathLike, *, force: bool = False, what: str = "--out",
                      simspec_json: bool = False) -> Path:
    """Check, before any work, that the file ``final`` can be written.

    Refused (one line): a directory or a non-regular file (``/dev/null``); an existing file without
    ``force``; with ``simspec_json`` and ``force``, an existing file that is not a JSON document
    simspec wrote (``simspec_output`` key); a location that cannot be written.
    """
    final = Path(final)
    if final.exists() or final.is_symlink():
        if final.is_dir():
            raise SimspecError(f"{what} {final}: is a directory (give a file name)")
        if not final.is_file() or final.is_symlink():
            raise SimspecError(f"{what} {final}: exists and is not a regular file; choose another path")
        if not force:
            raise SimspecError(f"{what} {final}: already exists (use --force to replace it)")
        if simspec_json and not is_simspec_json(final):
            raise SimspecError(f"{what} {final}: exists and is not a file simspec wrote; --force replaces only "
                               f"simspec outputs: remove it yourself or choose another path")
    _check_writable_dir(final.parent, what, final)
    return final


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename),
    with the permissions the umask allows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_png(path: str | os.PathLike, fig: Any, **savefig_kw: Any) -> None:
    """Render a matplotlib figure as PNG (``savefig_kw``: dpi, metadata, ...) and write it
    atomically with :func:`write_bytes`."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kw)
    write_bytes(path, buf.getvalue())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """A JSON-ready copy of ``obj``: numpy scalars → Python, non-finite floats → None, keys → str."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as deterministic JSON, atomically."""
    write_text(path, dumps_json(obj))


def chmod_tree(root: Path) -> None:
    """Directories under ``root`` to :func:`dir_mode`, files to :func:`file_mode` (what plain
    ``mkdir``/``open`` would have given under the umask)."""
    dm, fm = dir_mode(), file_mode()
    os.chmod(root, dm)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), dm)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, fm)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False, kind: str = "output") -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block completes.

    The directory gets a :data:`MARKER` of ``kind``. If ``final`` exists it is replaced only when
    ``overwrite`` is true and ``final`` is a directory holding a marker (:func:`check_output_dir`);
    otherwise :class:`SimspecError` is raised before anything is written. On any exception (Ctrl-C
    included) the temporary directory is removed. Permissions follow the umask.
    """
    final = Path(final)
    check_output_dir(final, kind, force=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        write_marker(tmp, kind)
        chmod_tree(tmp)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / "old")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
