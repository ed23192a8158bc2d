"""bench/bench_large.py's command line: ``--jobs`` (jobs per measurement,
the median reported) reaches every measurement it runs."""
import importlib.util
import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_large_under_test", os.path.join(ROOT, "bench", "bench_large.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobs_given_reaches_each_measurement(monkeypatch, capsys):
    bench, commands = _bench(), []
    node = types.SimpleNamespace(pid=1, terminate=lambda: None, wait=lambda: 0)
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
