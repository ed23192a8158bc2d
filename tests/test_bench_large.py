"""bench/bench_large.py's command line: ``--jobs`` (jobs per measurement,
the median reported) reaches every measurement it runs; a measurement that
fails or times out is reported and the run goes on; the node's home is
removed whatever happens."""
import json
import os
import subprocess
import sys
import tempfile
import types

from helpers import load_bench


def test_jobs_given_reaches_each_measurement(monkeypatch, capsys):
    bench, commands = load_bench("bench_large", monkeypatch), []
    node = types.SimpleNamespace(pid=1, terminate=lambda: None, wait=lambda: 0, poll=lambda: 0)
    monkeypatch.setattr(bench, "start_node", lambda: (node, 1, {}))

    def run(cmd, **kw):  # (a measurement's process: its command kept, a row made up)
        commands.append(cmd)
        row = {"mode": "mp", "kind": "bytes", "dir": "send", "mb": 1, "mbs": 1.0, "jobs": 7,
               "client_x": 0.0, "far_x": 0.0, "first_mbs": None,
               "cpu": {"client": 0.0, "node": 0.0, "workers": 0.0}}
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(bench, "subprocess", types.SimpleNamespace(run=run))
    monkeypatch.setattr(sys, "argv", ["bench_large.py", "--sizes", "1", "--modes", "mp",
                                      "--kinds", "bytes", "--jobs", "7"])
    bench.main()
    assert len(commands) == 2   # (send, result)
    for cmd in commands:
        assert cmd[cmd.index("--jobs") + 1] == "7", cmd


def _row(**kw):
    return {"mode": "mp", "kind": "bytes", "dir": "send", "mb": 1, "mbs": 1.0, "jobs": 1,
            "client_x": 0.0, "far_x": 0.0, "first_mbs": None,
            "cpu": {"client": 0.0, "node": 0.0, "workers": 0.0}, **kw}


def test_a_measurement_that_times_out_is_reported_and_the_run_goes_on(monkeypatch, capsys):
    """Before, one timeout ended the whole run (TimeoutExpired out of
    main), and the node's home stayed behind (always: it was never removed)."""
    bench, calls, homes, started = load_bench("bench_large", monkeypatch), [], [], []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **kw: homes.append(mkdtemp(*a, **kw))
                        or homes[-1])
    start_node = bench.start_node
    monkeypatch.setattr(bench, "start_node", lambda: started.append(start_node()) or started[-1])

    def run(cmd, **kw):
        calls.append(cmd)
        if len(calls) == 1:
            raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(_row(dir="result")),
                                     stderr="")
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "argv", ["bench_large.py", "--sizes", "1", "--modes", "mp",
                                      "--kinds", "bytes", "--jobs", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert len(calls) == 2   # (the result's cell ran after the send's timed out)
    assert "mp bytes send 1 MB failed" in out and "1 cells failed" in out, out
    assert homes and not any(os.path.exists(home) for home in homes)
    assert started and started[0][0].poll() is not None   # the node stopped
