"""The one exception family users see.

Every error a user can cause (a bad dataset, a wrong backbone name, a store built with other
weights) is raised as a :class:`DinocacheError` whose message names the file, episode or key and
what is wrong. The CLI prints that message on one line and exits non-zero, never a traceback.
"""


class DinocacheError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


class BackboneError(DinocacheError):
    """Unknown backbone name, unusable image size, or unloadable / mismatching weights."""


class DatasetError(DinocacheError):
    """A dataset that cannot be read, or an episode that is malformed."""


class EpisodeError(DatasetError):
    """A frame of one episode found bad while it is decoded (damaged, or at the wrong time): the
    episode, not the dataset, is unusable, which ``--skip-bad-episodes`` can still leave out.
    ``episode`` and ``camera`` say where; the message, as the reader worded it, names the frame."""

    def __init__(self, message: str, episode: int, camera: str) -> None:
        super().__init__(message)
        self.episode, self.camera = episode, camera


class StoreError(DinocacheError):
    """A feature store that is corrupt, incomplete, or built differently from what is asked."""


class TrainingError(DinocacheError):
    """A training run that cannot start or go on: a meaningless option, a taken run folder, a loss
    that stopped being finite."""


def os_error_line(err: OSError) -> str:
    """An OS error as one line: the file, and what the OS said (``No space left on device``,
    ``Read-only file system``...)."""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{err.filename}: {reason}" if err.filename else reason
