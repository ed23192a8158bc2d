"""The deployment recipes in deploy/: the systemd unit passes
``systemd-analyze verify``, and the options the unit, the container image
and the Kubernetes manifest give dpool-node are ones it accepts."""
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from dpool.daemons import node as daemon

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "systemd" / "dpool-node.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
pytestmark = pytest.mark.timeout(60)


def exec_start(text):
    (line,) = [s for s in text.splitlines() if s.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart="):])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    # verify checks that ExecStart's program exists: point it at one that does
    program = shutil.which("dpool-node") or sys.executable
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/dpool-node", program))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=30)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr
    # and the check does catch a broken unit
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/local/bin/", "ExecStart=bin/"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0


def test_systemd_unit_options_are_dpool_node_options():
    argv = exec_start(UNIT.read_text())
    assert argv[0] == "/usr/local/bin/dpool-node" and argv[-1] == "$DPOOL_NODE_OPTS"
    args = daemon.parse_args(argv[1:-1])
    assert (args.host, args.port, args.secret_file) == ("0.0.0.0", 51350, "/etc/dpool/secret")


def test_dockerfile_entrypoint_and_sources():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (entry,) = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    argv = json.loads(entry)
    assert argv[0] == "dpool-node"
    args = daemon.parse_args(argv[1:])
    assert args.host == "0.0.0.0" and args.secret_file == "/run/secrets/dpool"
    root = DEPLOY.parent
    for line in re.findall(r"^COPY (.*)$", text, re.M):
        for source in line.split()[:-1]:
            assert (root / source).exists(), source


def test_kubernetes_manifest_args():
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "dpool-node.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Service", "StatefulSet"]
    (container,) = docs[1]["spec"]["template"]["spec"]["containers"]
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    entry = json.loads(re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M)[0])
    args = daemon.parse_args(entry[1:] + container["args"])
    assert args.cpus == 4 and args.secret_file == "/run/secrets/dpool/secret"
    assert docs[0]["spec"]["ports"][0]["port"] == args.port


def test_kubernetes_pod_can_read_its_secret_and_drain():
    """The secret volume's files are root's (mode 0440): the image's non-root
    user reads them only through fsGroup; and the pod's grace period must
    outlast dpool-node's --grace, or SIGKILL cuts the drain short."""
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "dpool-node.yaml").read_text()))
    pod = docs[1]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    gid = re.search(r"useradd .*--gid (\d+)", text)
    assert gid, "the Dockerfile's user needs a fixed gid"
    if not volume["secret"].get("defaultMode", 0o644) & 0o004:
        assert pod.get("securityContext", {}).get("fsGroup") == int(gid.group(1))
    assert pod["terminationGracePeriodSeconds"] > daemon.parse_args([]).grace
