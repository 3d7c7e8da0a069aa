"""The one exception type for problems a user can cause and fix."""


class JobError(Exception):
    """A bad input (URI, archive, folder, setting). The CLI prints it as one line, exit 2.

    The message names the problem and the fix; it never carries a traceback or a secret.
    """

    exit_code = 2
