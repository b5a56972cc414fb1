"""The one exception family the CLI turns into a one-line message instead of a traceback, and the
integer test the API's argument checks share."""


class UserError(Exception):
    """Something the user can fix; str(err) is the whole message, ending with what to do."""


class ModelFolderError(UserError):
    """A model folder that is missing, incomplete, altered or of an unknown format."""


class ContextLengthError(UserError):
    """A sequence that would run past the model's position table."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' errors can run to pages), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_int_in(value, low: int, high: int | None = None) -> bool:
    """Whether `value` is an int (not a bool, which Python counts as one) from `low` to `high` (if given)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
