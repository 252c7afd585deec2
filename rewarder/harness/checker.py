# --- checker.py: the tests, and the verdict --------------------------------------------------
# ruff: noqa: F821  (encode, decode, read_frame, write_frame, WireError: wire.py)
# Runs as a uid of its own, in a directory the candidate cannot read, so the candidate can
# neither signal, trace nor read this process. The tests call `candidate(...)`, a proxy that
# sends the arguments to the candidate's process and decodes its reply as fresh plain data.
# The verdict goes to fd 5, which only this process holds:
#   "passed" (check() returned), "failed: <why>" (the candidate's doing),
#   "fault: <why>" (the tests themselves are broken: the rewarder reports no reward).
import builtins
import os
import sys

REQUESTS, REPLIES, VERDICT = 3, 4, 5


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one, or replied nonsense."""


class Candidate:
    """Stands for the candidate's function: each call is a round trip to its process."""

    def __init__(self, name):
        self.__name__ = name
        self.calls = 0

    def __call__(self, *args, **kwargs):
        try:
            request = ["call", encode(list(args)), encode(kwargs)]
        except WireError as e:
            raise Fault(f"the tests pass something that cannot cross to the candidate: {e}") from e
        self.calls += 1
        try:
            write_frame(REQUESTS, request)
        except OSError:
            pass  # the candidate's process is gone; its last reply may still be in the pipe
        try:
            reply = read_frame(REPLIES)
        except (OSError, WireError) as e:
            raise CandidateError(f"the candidate's process: {e}") from None
        if reply is None:
            raise CandidateError("the candidate's process ended")
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return decode(reply[1])
        if type(reply) is list and len(reply) == 3 and reply[0] == "raise":
            name, message = str(reply[1])[:100], str(reply[2])[:1000]
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(message)
            raise CandidateError(f"{name}: {message}")
        raise CandidateError("the candidate replied with something that is not a result")


class Fault(Exception):
    """The tests cannot run (no check(), setup fails): not the candidate's doing."""


def say(verdict):
    data = (verdict.replace("\n", " ")[:2000] + "\n").encode()
    os.write(VERDICT, data)


def main(entry_point):
    namespace = {"__name__": "__main__"}
    try:
        if os.path.exists("setup.py"):  # the problem's own code (HumanEval's prompt)
            with open("setup.py") as f:
                exec(compile(f.read(), "setup.py", "exec"), namespace)
        with open("tests.py") as f:
            exec(compile(f.read(), "tests.py", "exec"), namespace)
        check = namespace.get("check")
        if not callable(check):
            raise Fault("the tests define no check(candidate)")
    except BaseException as e:
        say(f"fault: the tests did not load: {type(e).__name__}: {e}")
        return 3
    candidate = Candidate(entry_point)
    namespace[entry_point] = candidate
    try:
        check(candidate)
    except Fault as e:
        say(f"fault: {e}")
        return 3
    except BaseException as e:
        say(f"failed: {type(e).__name__}: {e}")
        return 1
    if candidate.calls == 0:
        say("fault: check() never called the candidate")
        return 3
    say("passed")
    return 0


sys.exit(main(sys.argv[1]))
