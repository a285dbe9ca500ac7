"""User-facing errors: one line naming the problem and the fix (the CLI exits with status 2)."""


class FewstepError(ValueError):
    """Bad input from the user (missing file, unknown name, wrong shape...).

    The message is a single line that names the problem and how to fix it.
    """
