"""bench/bench_small.py: a case that fails is reported and the run goes on
with the others (local and via the node); the node it starts is stopped
and its home removed whatever happens."""
import os
import sys
import tempfile

from helpers import load_bench


def test_a_failing_case_is_reported_and_the_run_goes_on(monkeypatch, capsys):
    bench, bursts, homes = load_bench("bench_small", monkeypatch), [], []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **kw: homes.append(mkdtemp(*a, **kw))
                        or homes[-1])

    def round_trip(results, node, trips, rounds):
        raise RuntimeError("a measurement went wrong")
    monkeypatch.setattr(bench, "case_round_trip", round_trip)
    monkeypatch.setattr(bench, "case_burst", lambda results, node, n, rounds: bursts.append(node))
    monkeypatch.setattr(sys, "argv", ["bench_small.py", "--only", "round-trip", "burst",
                                      "--skip", "cpu", "--rounds", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert bursts[0] is None and isinstance(bursts[1], int) and len(bursts) == 2  # local, node
    assert out.count("[FAIL] round-trip") == 2, out
    assert "2 failed" in out, out
    assert homes and not any(os.path.exists(home) for home in homes)
