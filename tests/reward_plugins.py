"""Plug-in rewards for the tests: a user's module, named by import path (`tests.reward_plugins:
exact`) in a task's rewards and in `[rewarder] plugins`."""

from __future__ import annotations

import time

from rewarder.errors import VerifierError


def exact(completion: str, reference, task=None) -> float:
    """1 when the completion is the reference, letter for letter (spaces around left out)."""
    return float(completion.strip() == str(reference))


def undecided(completion: str, reference, task=None) -> float:
    """Never decides: the completion gets no reward, with this reason."""
    raise VerifierError("this plug-in cannot decide")


def stalls(completion: str, reference, task=None) -> float:
    """Longer than any test's timeout: the worker is killed, the completion gets no reward."""
    time.sleep(600)
    return 1.0


def takes_one_argument(completion: str) -> float:
    """Not a reward: it cannot take (completion, reference, task)."""
    return 0.0


NOT_A_FUNCTION = 3
