"""One exception type for bad user input; the CLIs turn it into a one-line message and exit code 2."""


class InputError(ValueError):
    """Bad user input: the message names the file, key or value and what was expected."""
