"""A benchmark's results file: a second run on the same day keeps the first one's."""

from __future__ import annotations

import argparse
import json

from benchmarks import figures


def test_a_second_run_of_the_day_does_not_overwrite_the_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(figures, "RESULTS", tmp_path)
    args = argparse.Namespace(json=True, out=None)
    first = figures.report([figures.figure("x", "s", [1.0, 2.0, 3.0])], args, "demo")
    second = figures.report([figures.figure("x", "s", [4.0, 5.0, 6.0])], args, "demo")

    assert first != second and first.parent == second.parent == tmp_path
    assert json.loads(first.read_text())["runs"] == [1.0, 2.0, 3.0]
    assert json.loads(second.read_text())["runs"] == [4.0, 5.0, 6.0]
    capsys.readouterr()
