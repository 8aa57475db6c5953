"""Typed errors. Anything a user can fix (bad recipe, bad path, bad model) is a `UserError`:
the CLI prints its message and exits with code 2, never a traceback."""
from __future__ import annotations


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

    def __init__(self, index: int, name: str, cause: BaseException):
        self.index, self.name, self.cause = index, name, cause
        super().__init__(f"pass {index} '{name}' failed: {type(cause).__name__}: {cause}")


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
