"""Errors a user sees: one line naming the file or tensor, and the CLI exit code it maps to."""


class Jee1Error(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_code = 1


class InputError(Jee1Error):
    """Bad input: a missing, malformed or inconsistent file, an unknown option value."""

    exit_code = 1


class QuestionTooLong(InputError):
    """The question and the fixed prompt do not fit the model's context."""


class ResourceError(Jee1Error):
    """The environment cannot do the job: not enough disk space, llama.cpp refused."""

    exit_code = 3


class Busy(Jee1Error):
    """The request queue is full; try again later."""

    exit_code = 5


class VerificationError(Jee1Error):
    """The output was written but failed its own check; nothing was kept."""

    exit_code = 4


# Documented in README.md and in each CLI's --help.
def exit_codes(*codes: int) -> str:
    """A command's --help epilog: only the exit codes it can return (0 always)."""
    return "Exit codes: " + "; ".join(f"{c} {EXIT_CODES[c]}" for c in (0, *codes)) + "."


EXIT_CODES = {
    0: "success",
    1: "bad input (the message names the file or tensor)",
    2: "usage error (unknown option, missing argument)",
    3: "environment problem (a folder read-only or full, permission denied, not enough disk space, llama.cpp failure)",
    4: "verification failed: converter output not kept, or a model refused by its manifest/signature",
    5: "engine busy (request queue full)",
}


def os_error_line(e: OSError) -> str:
    """One line for an OSError a user can cause: the path, then what the system said."""
    paths = [p for p in (e.filename, e.filename2) if p]
    return f"{' -> '.join(map(str, paths))}: {e.strerror or e}" if paths else str(e.strerror or e)
