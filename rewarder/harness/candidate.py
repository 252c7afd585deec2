# --- candidate.py: the model's program, serving the checker's calls ---------------------------
# ruff: noqa: F821  (encode, decode, read_frame, write_frame, WireError: wire.py)
# Runs as the candidate's uid with nothing worth stealing: everything it can reach here (this
# process, these fds) is its own. It defines the program, then answers each call the checker
# sends on fd 3 with the function's result (or exception) on fd 4. Whatever the program does
# to this process, only a plain-data result or an exception name reaches the checker.
import sys

REQUESTS, REPLIES = 3, 4


def serve(entry_point):
    namespace = {"__name__": "__main__"}
    try:
        with open("solution.py") as f:
            source = f.read()
        exec(compile(source, "solution.py", "exec"), namespace)
        if entry_point not in namespace:
            raise NameError(f"the program defines no {entry_point}")
        function = namespace[entry_point]
    except BaseException as e:
        reply_error(e)
        return
    while True:
        message = read_frame(REQUESTS)
        if message is None:
            return
        _, args, kwargs = message
        try:
            result = function(*decode(args), **decode(kwargs))
            reply = ["ok", encode(result)]
        except BaseException as e:
            reply = error_reply(e)
        write_frame(REPLIES, reply)


def error_reply(e):
    return ["raise", type(e).__name__, str(e)[:1000]]


def reply_error(e):
    try:
        write_frame(REPLIES, error_reply(e))
    except BaseException:
        pass


serve(sys.argv[1])
