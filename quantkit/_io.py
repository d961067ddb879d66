"""File and console I/O shared by every stage: atomic writes, user-written config files, progress.

Atomic output: a run that fails or is interrupted leaves no half-written file behind. Every
artifact is first written to a temporary file in the destination directory (same file system,
so the final ``os.replace`` is atomic), and only renamed into place once complete.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

#: quantkit's log: step timings and decisions (shown with -v, written in full with --log-file)
log = logging.getLogger("quantkit")
_written: list[list[Path]] = []
#: the files a data folder is read from (``quantkit.data.sources``), by suffix
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TABLE_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
ARRAY_EXTENSIONS = {".npy", ".npz"}  # stacks of files written while ``recording_writes`` is active


@contextmanager
def recording_writes() -> Iterator[list[Path]]:
    """Collect the paths every atomic write completes inside the block (the CLI's --json lists them)."""
    paths: list[Path] = []
    _written.append(paths)
    try:
        yield paths
    finally:  # by identity: nested recordings (quantkit demo runs commands) may hold equal lists
        del _written[next(i for i, p in enumerate(_written) if p is paths)]


def _record(*paths: Path) -> None:
    for stack in _written:
        stack.extend(p for p in paths if p not in stack)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any long work starts."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output directory {out} is an existing file; choose a directory", option="out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".quantkit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise QuantkitError(f"output directory {out} is not writable ({exc.strerror or exc}); choose another", option="out") from None
    return out


def _external_data_files(model: Path) -> list[Path]:
    """The files an ONNX model's external data names (relative to its folder)."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable model: the command reports that where it reads it
        return []
    tensors = list(proto.graph.initializer) + [a.t for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    locations = {e.value for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
    return [model.parent / loc for loc in sorted(locations)]


def _read_as(out: Path, given: Path) -> str | None:
    """What ``out`` is to the command when writing it would change what reading ``given`` reads:
    the same file, one of a model's external-data files, or an existing file in a data folder."""
    if not out.exists():
        return "an input of this command" if given.exists() and out.resolve() == given.resolve() else None
    if not given.exists():
        return None
    if os.path.samefile(out, given):
        return "an input of this command"
    data_file = out.suffix.lower() in IMAGE_EXTENSIONS | TABLE_EXTENSIONS.keys() | ARRAY_EXTENSIONS
    if given.is_dir() and data_file and out.resolve().is_relative_to(given.resolve()):
        return f"inside {given}, which this command reads"
    if given.suffix == ".onnx" and out.resolve().is_relative_to(given.resolve().parent):
        if any(f.exists() and os.path.samefile(out, f) for f in _external_data_files(given)):
            return f"the external data of {given}"
    return None


def check_output_file(dest: str | os.PathLike, *inputs: str | os.PathLike | None, option: str = "output") -> Path:
    """Refuse an output file that is one of the files the command reads (by identity, not by name;
    a model's external-data files included), a directory, or in a folder that does not exist or
    cannot be written; before any work starts. ``option``: the field that names ``dest``."""
    out = Path(dest)
    if out.is_dir():
        raise QuantkitError(f"{out} is a directory; give a file name", option=option)
    for given in inputs:
        if not isinstance(given, (str, os.PathLike)):
            continue  # none, or in-memory data: nothing on disk to protect
        if (what := _read_as(out, Path(given))) is not None:
            raise QuantkitError(f"{out} is {what}: quantkit never overwrites an input; choose another name", option=option)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise QuantkitError(f"folder {parent} does not exist; create it first", option=option)
    if not os.access(parent, os.W_OK):
        raise QuantkitError(f"folder {parent} is not writable; choose another", option=option)
    return out


def _public_mode(path: str | os.PathLike) -> None:
    """mkstemp creates 0600 files; give the result the permissions a plain open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _public_mode(tmp_path)
        os.replace(tmp_path, dest)
        _record(dest)
    finally:  # also on KeyboardInterrupt: never leave the temporary file behind
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on them (main thread only).

    Python runs signal handlers in the main thread whichever thread the signal reached, so the
    handlers are swapped for ones that only take note; a per-thread signal mask would not do.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in caught[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                signal.raise_signal(signum)


def write_files_atomic(files: dict[Path, bytes]) -> list[Path]:
    """Write a set of files so that either all of them appear or none is touched.

    All contents are staged as temporary files first; the renames happen only after every file
    was written, so an interruption during staging leaves the destination unchanged.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for dest, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            staged.append((Path(tmp), dest))  # before writing: an interrupted write still gets cleaned up
            try:
                fh = os.fdopen(fd, "wb")
            except BaseException:
                os.close(fd)
                raise
            with fh:
                fh.write(data)
            _public_mode(tmp)
        with _signals_deferred():  # the renames take microseconds: Ctrl-C or SIGTERM waits for all of them
            _replace_all(staged)
        _record(*files)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
    return list(files)


def _replace_all(staged: list[tuple[Path, Path]]) -> None:
    """Rename every staged file onto its destination, or, if one rename fails, put back what the
    earlier ones replaced (from hard-linked backups) so that no set is left half new, half old."""
    backups: dict[Path, Path | None] = {}
    try:
        for _, dest in staged:
            backups[dest] = None
            if dest.is_file():
                backup = dest.with_name(f".{dest.name}.{os.getpid()}.bak")
                os.link(dest, backup)
                backups[dest] = backup
        done: list[Path] = []
        try:
            for tmp, dest in staged:
                os.replace(tmp, dest)
                done.append(dest)
        except BaseException:
            for dest in done:
                backup = backups[dest]
                if backup is not None:
                    os.replace(backup, dest)
                else:
                    dest.unlink()
            raise
    finally:
        for backup in backups.values():
            if backup is not None and backup.exists():
                backup.unlink()


# ---- user-written config files (preprocessing configs, precision plans): JSON or YAML ----


#: plans and preprocessing configs larger than this are not ones (a plan for 100k nodes is ~5 MB)
MAX_CONFIG_BYTES = 32 << 20


def read_text_file(path: str | Path, what: str, max_bytes: int) -> str:
    """A user-given text file, read whole; a directory, a missing, oversized or binary file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise QuantkitError(f"{what} {path} is a directory; pass the file")
    try:
        if path.stat().st_size > max_bytes:
            raise QuantkitError(f"{what} {path} is {path.stat().st_size >> 20} MB: too large for a {what}")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise QuantkitError(f"{what} {path} is not a text file") from None
    except OSError as exc:
        raise QuantkitError(f"cannot read {what} {path}: {exc.strerror}") from None


def _parse_error(exc: Exception) -> str:
    """A parser's error on one line: YAML's problem and where it is (its own text spans lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def read_mapping_file(path: str | Path, what: str) -> dict[str, Any]:
    """Parse ``path`` as YAML (.yaml/.yml) or JSON; anything but a mapping is a clear error naming ``what``."""
    path = Path(path)
    text = read_text_file(path, what, MAX_CONFIG_BYTES)
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text) or {}
        else:
            doc = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear line
        raise QuantkitError(f"cannot parse {what} {path}: {_parse_error(exc)}") from None
    if not isinstance(doc, dict):
        raise QuantkitError(f"{what} {path} must hold a mapping of options")
    return doc


# ---- progress: a bar over samples on a terminal, silent otherwise or when asked to be quiet ----


def interactive(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def sample_bar(total: int | None, desc: str, quiet: bool) -> Any:
    """A tqdm bar over samples (tqdm is imported here, on first use, to keep ``import quantkit`` light)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not interactive(quiet), leave=False, dynamic_ncols=True)


def step_bar(total: int | None, desc: str, unit: str, quiet: bool) -> Any:
    """A tqdm bar over units of work (evaluations, trials, variants): count, rate and ETA on a
    terminal; silent with --quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not interactive(quiet), leave=False, dynamic_ncols=True)


class StepTimer:
    """Per-step wall times, reported in the summary (and to stderr as each step ends, on a TTY)."""

    def __init__(self, quiet: bool = True) -> None:
        self.quiet = quiet
        self.times: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = time.perf_counter() - start
            log.info("%s: %.2f s", name, self.times[name])
            if interactive(self.quiet) and not log.isEnabledFor(logging.INFO):
                print(f"  {name}: {self.times[name]:.2f} s", file=sys.stderr)
