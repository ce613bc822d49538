"""User-facing errors: the CLI turns :class:`InputError` into a one-line message and exit status 2."""


class InputError(ValueError):
  """Bad user input (paths, flags, checkpoints, texts): reported without a traceback."""
