"""The one exception type converters raise for bad input."""


class ConvertError(ValueError):
    """Bad or unsupported input; the message names the file, tensor or option at fault."""
