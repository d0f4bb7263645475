"""The one error type for user mistakes.

A `UserError` is something the person running meshlm can fix: a config value,
a missing or malformed file, a workdir that belongs to another run. Its message
is one line that names the field or file and says what to do. Entry points
print it as `error: <message>` and exit non-zero, without a traceback; any
other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in a config value, a file or a workdir; the message says which and what to do."""
