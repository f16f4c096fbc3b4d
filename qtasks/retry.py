"""Whether a failed task is retried, and after how long: pure decisions."""

from __future__ import annotations

import random
from collections.abc import Sequence


def should_retry(exc: BaseException, retries_left: int, retry_on_exc: Sequence[type[BaseException]] | None) -> bool:
    """True when retries are left and ``exc`` is one of ``retry_on_exc`` (subclasses match).

    With no ``retry_on_exc`` every :class:`Exception` is retried; cancellation never is.
    """
    from qtasks.exc import TaskCancelError

    if retries_left <= 0 or isinstance(exc, TaskCancelError) or not isinstance(exc, Exception):
        return False
    if not retry_on_exc:
        return True
    return isinstance(exc, tuple(retry_on_exc))


def backoff(retry_count: int, base: float, cap: float, rand: random.Random | None = None) -> float:
    """Seconds before retry number ``retry_count`` (0-based).

    "Equal jitter": between half and all of ``min(cap, base * 2**n)``.
    """
    ceiling = min(cap, base * (2 ** min(retry_count, 32)))
    return (rand or random).uniform(ceiling / 2, ceiling)
