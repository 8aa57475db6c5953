"""Typed errors. Anything a user can fix (bad recipe, bad path, bad model) is a `UserError`:
the CLI prints its message and exits with code 2, never a traceback."""
from __future__ import annotations

import reprlib


class UserError(Exception):
    """A problem in the user's input; the message names it and says how to fix it."""


class ConfigError(UserError):
    """One or more problems in a pass list, collected and reported together."""

    def __init__(self, problems: list[str], source: str = "pipeline"):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in {source}"
        super().__init__(head + ":\n  - " + "\n  - ".join(self.problems))


class ModelLoadError(UserError):
    """The model path is missing, corrupt or not a model we can read."""


class DataError(UserError):
    """The data file is missing, empty or in an unknown format."""


class OutputExistsError(UserError):
    """The output directory exists and --overwrite was not given."""


class PassFailed(Exception):
    """A pass raised while running; names the pass so the user knows where it stopped."""

    def __init__(self, index: int, name: str, cause: BaseException, during: str = ""):
        self.index, self.name, self.cause = index, name, cause
        super().__init__(f"pass {index} '{name}' failed{during}: {type(cause).__name__}: {clip(str(cause), 2000)}")


class OutputMatchError(Exception):
    """An exported graph does not reproduce the PyTorch (or previous-stage) outputs."""

    def __init__(self, what: str, rows: list[dict]):
        self.rows = rows
        lines = [f"{what}: outputs do not match"]
        for r in rows:
            flag = "OK  " if r["ok"] else "FAIL"
            lines.append(
                f"  {flag} {r['name']}: max_abs_diff={r['max_abs_diff']:.3g} "
                f"(tolerance {r['atol']:.3g}), cosine={r['cosine']:.6f} (min {r['min_cosine']})"
            )
        super().__init__("\n".join(lines))


def short(value: object, limit: int = 80) -> str:
    """The repr of a user value for a message, at most `limit` characters, in bounded work.

    A plain repr() is not safe on hostile input: a structure built from shared references (YAML
    aliases nested a few levels) prints as gigabytes, and an int of more than 4300 digits raises.
    reprlib stops at a few levels and a few items per container, so the work is small whatever
    the value."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value we cannot print is named by its type instead
        digits = f" of about {int(value.bit_length() * 0.30103)} digits" if isinstance(value, int) else ""
        text = f"<{type(value).__name__}{digits}>"
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel = 3
    r.maxtuple = r.maxlist = r.maxarray = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = 6
    r.maxstring = r.maxother = r.maxlong = 60
    return r


_REPR = _bounded_repr()


def clip(text: str, limit: int = 200) -> str:
    """A message text (a library's error, a line of a file) cut to `limit` characters."""
    text = str(text)
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def short_path(path: object, limit: int = 160) -> str:
    """A path for a message: its start and its end when it is longer than `limit` characters."""
    text = str(path)
    if len(text) <= limit:
        return text
    head = (limit - 3) // 2
    return text[:head] + "..." + text[len(text) - (limit - 3 - head):]


def stat_or_none(path: object):
    """os.stat of `path` (following links), None when nothing is there. A name the system refuses to
    look up (over 255 bytes per part, a NUL byte, a parent that cannot be searched) is one UserError
    naming it; pathlib's exists() / is_file() raise OSError on those instead of answering."""
    import errno
    import os

    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link loop points nowhere
            return None
        raise UserError(f"cannot use '{short_path(path)}': {exc.strerror or exc}") from None
    except ValueError:  # an embedded NUL byte
        raise UserError(f"cannot use '{short_path(path)}': a path may not contain a NUL byte") from None


def exists(path: object) -> bool:
    """Path.exists() that answers for every name (see `stat_or_none`)."""
    return stat_or_none(path) is not None


def regular_file(path: object, what: str, fix: str, missing: str, error: type = UserError):
    """os.stat of a file about to be read, refusing (with `error`) a missing path (`missing` is the
    whole message), a folder, and a pipe / device / socket, which is never opened: it would block or
    never end. `what` names the file in the message ("data", "recipe"), `fix` says what to give."""
    import stat

    st = stat_or_none(path)
    if st is None:
        raise error(missing)
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} '{short_path(path)}' is a folder: {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} '{short_path(path)}' is not a regular file (a pipe, a device or a socket): {fix}")
    return st
