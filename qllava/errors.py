"""The error shared by modules at every level (a problem with a data file or a data setting) and how an error reads
to the user. It lives here, with no imports, so that light modules (the benchmark scorers, read by the recipe's
validation and the CLI's help) can raise it without importing the data pipeline."""


class DataError(ValueError):
    """A problem with a data file or a data setting, naming the file or the recipe key."""


def user_message(error: Exception) -> str:
    """An error's message as the user should read it. An error raised in a DataLoader worker process (a batch's image
    that cannot be decoded) comes back from torch as the same type with the worker's whole traceback as its message:
    its own message is the traceback's last line."""
    text = str(error)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else text
    return text
