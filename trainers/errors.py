"""One exception type for bad user input; the CLIs turn it into a one-line message and exit code 2."""

import reprlib

# How much of a value an error message quotes: a few elements of a container, the ends of a long string.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxdict, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxset = 2, 4, 4, 4, 4
_QUOTE.maxstring, _QUOTE.maxlong, _QUOTE.maxother = 60, 40, 60


def short_repr(value: object) -> str:
    """repr of a value bounded in size and work (never the whole of an unbounded input in a message)."""
    return _QUOTE.repr(value)


class InputError(ValueError):
    """Bad user input: the message names the file, key or value and what was expected."""


class TrainingDivergedError(InputError):
    """A non-finite training loss. Not a program bug: the config (e.g. the learning rate) or the data made the
    run diverge, and re-running it unchanged diverges again, so the CLIs report it like bad input (exit 2)."""


class ServiceUnavailable(RuntimeError):
    """A service the run needs (the MLflow tracking server, the object store) stayed unreachable longer than the run
    waits for it. The CLIs report it in one line with exit code 3: not bad input, and re-running once it is back
    resumes the run."""
