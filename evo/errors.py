"""Errors shared across evo. Exit codes: 0 ok, 1 a job or check failed, 2 bad input."""


class EvoError(Exception):
    """Raised for failures the user should see as one clear line (exit 1)."""

    exit_code = 1


class BadInput(EvoError, ValueError):
    """Raised for input that is wrong in itself; the message names file, field and expectation (exit 2)."""

    exit_code = 2
