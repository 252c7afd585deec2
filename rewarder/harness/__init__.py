"""Programs that run *inside* the sandbox for `code_tests` (not imported by the rewarder).

Each sandboxed program is one file: `wire.py` followed by `candidate.py` or `checker.py`
(`python3 -I` puts no script directory on `sys.path`, so nothing can be imported from the
work dir). They use the standard library only and run under any Python 3.8+.
"""
