"""The one exception type whose message is meant for people, not for stack traces."""


class StudioError(Exception):
    """A problem with the user's input, explained in one line (and the fix, where there is one).

    The CLI prints it and exits with status 2; the app shows it in the page. Anything else that
    escapes is a bug in the studio.
    """
