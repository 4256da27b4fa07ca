"""One exception type for every refusal the pipeline makes.

A `PipelineError` message is a single line that says what was wrong and how to fix it. The CLI prints it
without a traceback (unless `--debug`) and exits with status 2; anything else is a bug and keeps its traceback.
"""


class PipelineError(ValueError):
    """Bad input from the user: recipe, CLI value, data file, adapter, config or tracking URI."""

    def __init__(self, message: str):
        # One line, always: callers may pass multi-line text built from other exceptions.
        super().__init__(" ".join(str(message).split()))


def did_you_mean(word: str, known) -> str:
    """` (did you mean 'x'?)` naming the entry of `known` closest to `word` (case-insensitive), else ''."""
    import difflib

    by_lower = {str(k).lower(): str(k) for k in known}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
