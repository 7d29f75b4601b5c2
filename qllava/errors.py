"""The error shared by modules at every level: a problem with a data file or a data setting. It lives here, with
no imports, so that light modules (the benchmark scorers, read by the recipe's validation and the CLI's help)
can raise it without importing the data pipeline."""


class DataError(ValueError):
    """A problem with a data file or a data setting, naming the file or the recipe key."""
