"""The project's error classes for user mistakes: what a config, a model folder, a prompt file or a dataset
can get wrong. Commands catch exactly these (`UserError`) and print one line (DDSPO_DEBUG=1 shows the
traceback); anything else is a bug and keeps its traceback. Each also subclasses the builtin it used to be
(ValueError, FileNotFoundError, RuntimeError), so older `except` clauses still work."""


class UserError(Exception):
    """A mistake the user can fix; the message names the file, key or value."""


class ConfigError(UserError, ValueError):
    """A config key is unknown, mistyped, has an invalid value or contradicts another."""


class MeshError(UserError, ValueError):
    """The mesh does not fit the devices or the batch."""


class ModelError(UserError, ValueError):
    """A model folder or weight file is missing, incomplete or not what the config says."""


class DataError(UserError, ValueError):
    """A prompt file or a preference dataset is malformed."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


def one_line(e: BaseException) -> str:
    """The message a command prints for a user mistake."""
    return f"error: {e}\n(set DDSPO_DEBUG=1 for the traceback)"


def debug() -> bool:
    import os

    return bool(os.environ.get("DDSPO_DEBUG"))


USER_ERROR_EXIT = 2  # every command: a user mistake exits 2 (argparse's code for a usage error)


def user_message(e: BaseException) -> str | None:
    """The one line a command prints for `e`, or None when `e` is a bug (it keeps its traceback): a UserError,
    or a SystemExit carrying a message (config loading, prepare's checks)."""
    if isinstance(e, UserError):
        return one_line(e)
    if isinstance(e, SystemExit) and isinstance(e.code, str):
        return e.code if e.code.startswith("error:") else f"error: {e.code}"
    return None


class user_exits:
    """The one handler of every command: `with user_exits():` around its body turns a user mistake into one
    line on stderr and exit USER_ERROR_EXIT (2); with DDSPO_DEBUG=1 the traceback is printed first. Anything
    else is a bug and keeps its traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        import sys
        import traceback

        message = None if e is None else user_message(e)
        if message is None:
            return False
        if debug():
            traceback.print_exception(kind, e, tb)
        print(message, file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None


def run_command(fn, *args, **kwargs) -> int:
    """`user_exits` for a command whose `main()` returns its exit code: fn's user mistake -> 2, else 0."""
    try:
        with user_exits():
            fn(*args, **kwargs)
    except SystemExit as e:
        if e.code != USER_ERROR_EXIT:
            raise
        return USER_ERROR_EXIT
    return 0
