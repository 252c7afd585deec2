"""Imported once by the pool's forkserver, so every worker forked from it starts warm.

Math-Verify and sympy set up parsers and caches lazily: the first few verifications of a
fresh process take 0.1-0.5 s each, against about 5 ms warm. Doing it here, before any fork,
also makes a replacement worker (after a timeout) as fast as the others.
"""

from rewarder.rewards import accuracy_math

for _answer, _reference in [
    (r"\boxed{\frac12}", "0.5"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3, \frac{\pi}{2})"),
    (r"\boxed{x^2+2\sqrt{3}x+1}", r"1+x^2+2\sqrt3 x"),
    (r"\boxed{[1, 2)}", r"[1,2)"),
    (r"\boxed{\text{(C)}}", "C"),
]:
    accuracy_math(_answer, _reference)
