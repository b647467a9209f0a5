"""One exception type for bad user input; the CLIs turn it into a one-line message and exit code 2."""


class InputError(ValueError):
    """Bad user input: the message names the file, key or value and what was expected."""


class TrainingDivergedError(InputError):
    """A non-finite training loss. Not a program bug: the config (e.g. the learning rate) or the data made the
    run diverge, and re-running it unchanged diverges again, so the CLIs report it like bad input (exit 2)."""
