"""The one exception a reward function may raise."""


class VerifierError(Exception):
    """A verifier could not decide (unparseable reference, sandbox that did not start, ...).

    The completion then gets `reward=None` with this message as the reason: never a silent 0,
    which would teach the policy something false. A wrong or missing answer is not an error:
    it scores 0.
    """
