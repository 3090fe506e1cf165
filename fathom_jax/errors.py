"""Errors that the command line reports as one line and exit status 2."""


class UsageError(Exception):
  """Bad user input: a flag, a preset, a config field, a path or a backend."""


class DataError(UsageError):
  """A dataset path that does not exist or whose files are not in the expected format."""


class RunFailed(Exception):
  """A run that started but could not finish: a non-finite loss, memory exhausted. The result
  file records it as failed; the command line exits 1."""
