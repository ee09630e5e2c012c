"""One exception type for every problem a user can fix.

The CLI prints `AgecliError` as a short message (what, where, how to fix) without a
traceback; anything else is a bug and keeps its traceback.
"""


class AgecliError(Exception):
    """A problem with the user's input, data or environment, explained in the message."""


def missing_facenet() -> AgecliError:
    return AgecliError(
        "facenet-pytorch (MTCNN face detector) is not installed.\n"
        "Install it without its outdated pins:  pip install --no-deps facenet-pytorch==2.6.0\n"
        "(or run `make install`). Already-aligned crops can use `--detector none` instead."
    )
