"""User-facing errors.

Every error a person can cause (a bad config, a malformed dataset, a model path that does not exist)
is a `LeantuneError` whose message is one line that says what is wrong and how to fix it. The CLI
prints that line and exits with code 2, without a traceback. Anything else is a bug in leantune and
keeps its traceback.
"""


class LeantuneError(Exception):
    """A problem with the user's input; the message names the fix."""

    exit_code = 2


class ConfigError(LeantuneError):
    """The config file or a command-line override is invalid."""


class DataError(LeantuneError):
    """The dataset cannot be read or holds unusable examples."""


class ModelError(LeantuneError):
    """The model or tokenizer cannot be loaded, or an adapter does not fit it."""


class TrainingError(LeantuneError):
    """Training cannot go on (a NaN loss, a checkpoint that does not match the run)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error, cut to fit one of ours)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
