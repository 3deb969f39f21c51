"""The one exception type whose message is meant for people, not for stack traces, and small checks that raise it."""

import numbers


class StudioError(Exception):
    """A problem with the user's input, explained in one line (and the fix, where there is one).

    The CLI prints it and exits with status 2; the app shows it in the page. Anything else that
    escapes is a bug in the studio.
    """


def is_whole(value: object, plain: bool = False) -> bool:
    """Whether ``value`` is a whole number, not a bool, a float or a string: what counts, sizes and indices must
    be before they reach torch, which fails on 2.5 deep inside and takes True as 1. numpy's integers count, except
    with ``plain`` (values that configs and records write as JSON, which has no numpy types)."""
    return isinstance(value, int if plain else numbers.Integral) and not isinstance(value, bool)


MAX_SEED = 2**32 - 1  # numpy's and most tools' seed range; torch takes it too


def check_seed(seed: int) -> int:
    """``seed`` when it is a whole number from 0 to :data:`MAX_SEED`, else a one-line :class:`StudioError`:
    torch refuses larger ones with an overflow deep in a run."""
    if not is_whole(seed) or not 0 <= seed <= MAX_SEED:
        raise StudioError(f"the seed must be a whole number from 0 to {MAX_SEED:,} (got {seed!r})")
    return seed


def expect(value: object, kind: type, what: str) -> None:
    """A one-line StudioError when ``value`` is not a ``kind``: the float model passed where the quantized one
    belongs (or the reverse) fails here, not as an AttributeError deep inside."""
    if not isinstance(value, kind):
        raise StudioError(f"{what} must be a {kind.__name__}, got a {type(value).__name__}")
