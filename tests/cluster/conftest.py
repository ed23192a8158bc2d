"""Fixtures of the multi-host tests: a :class:`helpers_netns.LanLab` (hosts
in network and UTS namespaces on two subnets; root) and ``dpool-node``
processes on its hosts."""
import signal
import subprocess
import sys

import pytest

from helpers import node_env, poll_for, start_node
from helpers_netns import LAB_SECRET, LanLab


@pytest.fixture
def lanlab(request):
    """The default lab (client, nodes a b c on the LAN; d, e on LAN2);
    ``@pytest.mark.lab(extra=[...], ...)`` passes other LanLab arguments."""
    marker = request.node.get_closest_marker("lab")
    lab = LanLab(**(marker.kwargs if marker else {}))
    try:
        yield lab.up()
    finally:
        lab.down()


@pytest.fixture
def lab_nodes(lanlab, tmp_path):
    """start(name, ...): a dpool-node (1 CPU, the lab's secret) on host
    ``name``, listening on its address at ``port`` (default 51350: inside
    the lab's namespaces only, where discovery looks)."""
    started = []

    def start(name, port=51350, args=()):
        host = lanlab[name]
        node = start_node(tmp_path / f"node-{name}", cpus=1, secret=LAB_SECRET, port=port,
                          prefix=host.prefix(), args=["--host", host.address, *args])
        node.host = host
        node.addr = (host.address, node.port)
        started.append(node)
        return node
    start.started = started
    yield start
    for node in started:
        node.kill()


class RelayProcess:
    """``python -m dpool.daemons.relay`` on a lab host; output in files."""

    def __init__(self, host, workdir, args):
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = workdir / "relay.out", workdir / "relay.err"
        cmd = [*host.prefix(), sys.executable, "-m", "dpool.daemons.relay", *args]
        env = node_env(LAB_SECRET)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env,
                                         stdin=subprocess.DEVNULL)
        poll_for(self._relaying, timeout=15, message="dpool-relay to start")

    def _relaying(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"dpool-relay exited with {self.proc.returncode}: "
                                 f"{self.stderr()}")
        return "dpool-relay: relaying" in self.out_path.read_text()

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def stop(self):
        """SIGTERM; it must exit 0 at once."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("dpool-relay ignored SIGTERM") from None
        assert code == 0, self.stderr()


@pytest.fixture
def lab_relay(lanlab, tmp_path):
    """start(name, *args): dpool-relay on host ``name`` with the lab's secret."""
    started = []

    def start(name, *args):
        relay = RelayProcess(lanlab[name], tmp_path / f"relay-{name}-{len(started)}", args)
        started.append(relay)
        return relay
    yield start
    for relay in started:
        if relay.proc.poll() is None:
            relay.proc.kill()
            relay.proc.wait(10)
