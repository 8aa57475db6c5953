"""Output directories: the one place that decides where a command may write, and how it replaces.

Every command that writes (`compress run`, `compress decode`, `Pipeline.run`, `riq_export.decode`)
goes through `claim(outdir, inputs, overwrite)` before it writes a byte, and through `publish`
to put the finished folder in place. The rules:
- OUTDIR may not be, contain, or sit inside any input (model and its external data, tokenizer,
  data, recipe, `.riq` file), nor be the current directory or one of its parents;
- the run's work folder (`.OUTDIR.partial`, which a new run clears) may not hold an input either;
- an existing OUTDIR is replaced only with `overwrite`, and only when compress wrote it: every
  output folder carries a small marker file (`MARKER`); anything else is refused, so --overwrite
  can never empty a folder of the user's;
- `~` is expanded (as the shell does not in `--output=~/x`); callers write where `claim` returns;
- a path whose parent is a file, a name too long for the folders built beside it, and a place
  that cannot be written (no permission, a read-only or pseudo file system such as /proc) are
  refused with a message, not a traceback.
Replacing is a rename of the finished folder into place; the old one is removed only after."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

from compress.errors import OutputExistsError, UserError, exists, short_path, stat_or_none

MARKER = ".compress-output.json"  # in every folder compress writes; --overwrite replaces only these
NAME_MAX = 255  # bytes in one part of a path (Linux, macOS, Windows)
BESIDE = 22  # what the longest folder built beside OUTDIR adds to its name: ".NAME.tmp-1234abcd-4194304"
PSEUDO_FILE_SYSTEMS = {"proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore",
                       "bpf", "configfs", "fusectl", "mqueue", "efivarfs", "binfmt_misc", "autofs", "nsfs"}


def work_dir(outdir: Path) -> Path:
    """Where a run builds OUTDIR before the final rename (kept after a failure, for --resume)."""
    return outdir.parent / f".{outdir.name}.partial"


def claim(outdir: str | Path, inputs: Iterable[Any], overwrite: bool, *, work: Path | None = None) -> Path:
    """Check that `outdir` may be written (see the module docstring); raise one UserError if not.
    `inputs` are paths (or strings naming paths; anything else, like a corpus name, is skipped).
    `work` is the temporary folder the command builds in, when it is not fresh (runs).
    Returns OUTDIR with `~` expanded: the path to write."""
    outdir = Path(outdir).expanduser()
    work = Path(work).expanduser() if work is not None else None
    _check_name(outdir)
    out = outdir.resolve()
    _check_place(outdir, out)
    for item in inputs:
        path = _existing(item)
        if path is None:
            continue
        if path == out or out in path.parents:
            raise UserError(f"output directory '{outdir}' holds the input '{item}': choose a folder outside it "
                            "(the output is replaced as a whole)")
        if path in out.parents:
            raise UserError(f"output directory '{outdir}' is inside the input '{item}': choose a folder outside it "
                            "(compress never writes into its inputs)")
        if work is not None and work.resolve() in path.parents:
            raise UserError(f"the input '{item}' lives inside '{work}', the unfinished run folder that this run "
                            f"clears or reuses: copy it out of there first, or choose another -o")
    if exists(outdir) or outdir.is_symlink():
        _check_replaceable(outdir, overwrite)
    if work is not None and exists(work) and not is_ours(work):
        raise UserError(f"'{work}' exists and was not written by compress (no {MARKER} in it): "
                        "move it away, or choose another -o")
    return outdir


def _check_name(outdir: Path) -> None:
    """A path the system refuses to look up (a part over 255 bytes, the whole over 4096), or a name
    too long for the folders built beside it (`.NAME.partial`, `.NAME.tmp-...`)."""
    stat_or_none(outdir)  # raises a UserError naming the path when it cannot be looked up
    size = len(os.fsencode(outdir.name))
    if size + BESIDE > NAME_MAX:
        raise UserError(f"output directory name '{short_path(outdir.name)}' is {size} bytes long: at most "
                        f"{NAME_MAX - BESIDE} (compress builds it beside as .NAME.partial); choose a shorter -o")


def _check_place(outdir: Path, out: Path) -> None:
    cwd = Path.cwd().resolve()
    if not outdir.name or outdir.name in (".", "..") or out == cwd or out in cwd.parents:
        raise UserError(f"output directory '{outdir}' is the current directory or above it: choose a new folder")
    if out == Path(out.anchor) or out == Path.home().resolve():
        raise UserError(f"output directory '{outdir}' is the root or home folder: choose a new folder")
    for parent in outdir.absolute().parents:  # -o some_file/out: say so instead of failing on mkdir
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write '{outdir}': '{parent}' is a file, not a folder; choose another -o")
            why = _unwritable(parent)
            if why:
                raise UserError(f"cannot write '{outdir}': {why}; choose another -o")
            break


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be created in `folder` (an existing folder), when a cheap look tells."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"you may not create files in '{folder}'"
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"'{folder}' is on a read-only file system"
    except (OSError, AttributeError):  # no statvfs (Windows)
        pass
    kind = _file_system(folder)
    if kind in PSEUDO_FILE_SYSTEMS:
        return f"'{folder}' is on the {kind} pseudo file system, which holds no files of ours"
    return None


def _file_system(folder: Path) -> str | None:
    """The type of the file system `folder` is on, from /proc/self/mounts (Linux); None elsewhere."""
    try:
        lines = Path("/proc/self/mounts").read_text(errors="replace").splitlines()[:10000]
    except OSError:
        return None
    where, best, kind = str(folder.resolve()), -1, None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # the last of equal mount points is the one in effect
            best, kind = len(point), parts[2]
    return kind


def _check_replaceable(outdir: Path, overwrite: bool) -> None:
    if not overwrite:
        raise OutputExistsError(f"output directory '{outdir}' already exists: choose another -o, or pass --overwrite")
    if outdir.is_symlink() or not outdir.is_dir():
        raise UserError(f"'{outdir}' exists and is not a folder compress wrote: --overwrite replaces only "
                        "compress's own output folders; remove it yourself or choose another -o")
    if not is_ours(outdir):
        raise UserError(f"'{outdir}' was not written by compress (it has no {MARKER}): --overwrite replaces only "
                        "compress's own output folders; empty or remove it yourself, or choose another -o")


def _existing(item: Any) -> Path | None:
    if not isinstance(item, (str, Path)):
        return None
    try:
        path = Path(item).expanduser()
        return path.resolve() if path.exists() else None
    except (OSError, ValueError):  # a name too long for a path, a NUL byte: not a file of the user's
        return None


def is_ours(folder: Path) -> bool:
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("tool") == "compress"
    except (OSError, ValueError, AttributeError):
        return False


def mark(folder: Path, command: str) -> None:
    """Tag a folder compress is writing, so a later --overwrite may replace it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"tool": "compress", "command": command}) + "\n", encoding="utf-8")


def publish(work: Path, outdir: Path) -> None:
    """Rename the finished folder into place; an old OUTDIR (checked by `claim`) is removed only
    after the new one is there, so a crash in between leaves one of the two whole."""
    old = None
    if outdir.exists():
        if not is_ours(outdir):  # claim() checked this; the folder may have changed since
            raise UserError(f"'{outdir}' changed while compress ran and is no longer its output: "
                            f"the result is kept in '{work}'")
        old = outdir.parent / f".{outdir.name}.old-{uuid.uuid4().hex[:8]}"
        outdir.rename(old)
    work.rename(outdir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clear(folder: Path) -> None:
    """Remove a folder compress made (a stale work folder); refuse anything else."""
    if folder.exists():
        if not is_ours(folder):
            raise UserError(f"'{folder}' was not written by compress: move it away, or choose another -o")
        shutil.rmtree(folder)


def fresh_temp(outdir: Path, command: str) -> Path:
    """A new marked temporary folder beside OUTDIR (same file system, so publish is a rename)."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = outdir.parent / f".{outdir.name}.tmp-{uuid.uuid4().hex[:8]}-{os.getpid()}"
    tmp.mkdir()
    mark(tmp, command)
    return tmp
