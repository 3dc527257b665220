"""Errors shared across evo. Exit codes: 0 ok, 1 a job or check failed, 2 bad input."""


class EvoError(Exception):
    """Raised for failures the user should see as one clear line (exit 1)."""

    exit_code = 1


class BadInput(EvoError, ValueError):
    """Raised for input that is wrong in itself; the message names file, field and expectation (exit 2)."""

    exit_code = 2


def yaml_problem(exc: BaseException) -> str:
    """A YAML parser's error as one line: 'line L, column C: what is wrong'."""
    err = exc if hasattr(exc, "problem_mark") else exc.__context__  # msgspec wraps PyYAML's
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        what = getattr(err, "problem", None) or getattr(err, "context", None) or "not valid"
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return " ".join(str(exc).split())
