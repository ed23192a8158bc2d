"""What a client keeps alive for the garbage collector (issue 16): the
modules a local run never needs stay unimported, and a queued job holds
as few GC-allocated objects as it can."""
import pathlib
import subprocess
import sys
import textwrap

from dpool.core.job import Job

_LOCAL_CLUSTER = textwrap.dedent("""
    import sys
    import dpool
    from tasks import double

    with dpool.JobCluster(double, cpus=1, loglevel=40) as cluster:
        assert cluster.submit(3)(timeout=60) == 6
    print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
""")


def test_a_local_cluster_imports_neither_psutil_nor_cryptography():
    """A JobCluster on its embedded node (no secret: only 127.0.0.1 is
    tried before it starts one) never looks at the network interfaces
    (psutil) nor seals a record (cryptography): together 4,900 GC-tracked
    objects every full collection of the client would walk
    (tests/node/test_startup_imports.py: the same for an Executor)."""
    out = subprocess.run([sys.executable, "-c", _LOCAL_CLUSTER], capture_output=True,
                         text=True, timeout=120, cwd=str(_tests_dir()))
    assert out.returncode == 0, out.stderr
    modules = set(out.stdout.split())
    assert "dpool" in modules
    assert not modules & {"psutil", "cryptography"}


def test_a_queued_job_holds_a_lone_frame_without_a_tuple():
    job = Job(1, 1, [b"call"])
    assert type(job._frames) is bytes  # (no tuple alive per queued job)
    assert job.frames == (b"call",)
    several = [b"head", bytearray(b"buffer")]
    job = Job(2, 1, several)
    assert list(job.frames) == several
    job = Job(3, 1, [bytearray(b"not bytes")])  # (kept as given: read as a sequence)
    assert list(job.frames) == [bytearray(b"not bytes")]
    job.frames = None  # (done)
    assert job.frames is None


def _tests_dir():
    return pathlib.Path(__file__).resolve().parents[1]
