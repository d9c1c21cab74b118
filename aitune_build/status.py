"""A target's status after a build: one enum, a str so JSON and comparisons with plain strings stay as they were."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    BUILT = "built"
    CACHED = "cached"
    FAILED = "failed"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)



DONE = (Status.BUILT, Status.CACHED)  # the output folder holds a current build
