"""The one exception family the command line turns into a clean error message (no traceback)."""


class PipelineError(Exception):
    """Bad input or parameters: the message names the file/key/value and what to do."""
