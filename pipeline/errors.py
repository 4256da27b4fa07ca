"""One exception type for every refusal the pipeline makes.

A `PipelineError` message is a single line that says what was wrong and how to fix it. The CLI prints it
without a traceback (unless `--debug`) and exits with status 2; anything else is a bug and keeps its traceback.
"""


class PipelineError(ValueError):
    """Bad input from the user: recipe, CLI value, data file, adapter, config or tracking URI."""

    def __init__(self, message: str):
        # One line, always: callers may pass multi-line text built from other exceptions.
        super().__init__(" ".join(str(message).split()))
