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


def run_command(fn, *args, **kwargs) -> int:
    """A command's body -> its exit code: a user mistake prints one line and returns USER_ERROR_EXIT (2;
    DDSPO_DEBUG=1 re-raises);
    anything else is a bug and keeps its traceback."""
    import sys

    try:
        fn(*args, **kwargs)
    except UserError as e:
        if debug():
            raise
        print(one_line(e), file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


USER_ERROR_EXIT = 2  # every command: a user mistake exits 2 (argparse's code for a usage error)


class user_exits:
    """`with user_exits():` around a command's body: a UserError, or a SystemExit carrying a message (config
    loading, prepare's checks), prints one line and exits USER_ERROR_EXIT like `run_command`; with DDSPO_DEBUG=1
    the traceback is printed first."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        import sys
        import traceback

        if e is None:
            return False
        if isinstance(e, UserError):
            message = one_line(e)
        elif isinstance(e, SystemExit) and isinstance(e.code, str):
            message = e.code if e.code.startswith("error:") else f"error: {e.code}"
        else:
            return False
        if debug():
            traceback.print_exception(kind, e, tb)
        print(message, file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
