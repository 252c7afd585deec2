"""The two exceptions a reward function may raise: it could not decide, or it decided 0 by a
rule whose reason is worth recording."""


class VerifierError(Exception):
    """A verifier could not decide (unparseable reference, sandbox that did not start, ...).

    The completion then gets `reward=None` with this message as the reason: never a silent 0,
    which would teach the policy something false. A wrong or missing answer is not an error:
    it scores 0.
    """


class Disqualified(Exception):
    """The completion scores 0 on this reward by a rule, and the message says which.

    For what the completion did, not the verifier: an answer too long to be a final answer,
    one that stalled or broke the verifier on its own (the reference verifies fine), one that
    hedges (`x = 1 = 2 = 5`, `\\approx`). Such a completion must not get `reward=None`: a
    completion without a reward is left out of its group's advantage, so a policy would learn
    to stall the verifier to escape its zeros (issue 10).
    """
