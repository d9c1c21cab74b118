"""One exception root. User errors carry the fix and print without a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class AituneError(Exception):
    """Root of every error aitune-build raises on purpose."""

    exit_code = 1


class UserError(AituneError):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""

    exit_code = 2


class ManifestError(UserError):
    """A manifest problem, located by file and dotted key path."""

    def __init__(self, file: str, key: str, message: str):
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


class BackendUnavailable(AituneError):
    """The backend cannot run on this machine (no CUDA, library missing). The message says what to install."""


class CheckFailed(AituneError):
    """The artifact's outputs differ from eager beyond tolerance."""


class ReproducibilityError(AituneError):
    """A rebuild of a cached target gave different bytes."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    import difflib

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
