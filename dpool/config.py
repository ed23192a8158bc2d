"""Defaults shared by the client, the node and the commands.

Ports (TCP, all on the same numbers as documented in the README):

=====================  =====
``dpool-node``         51350
``dpool-scheduler``    51351
``dpool-relay``        51352
=====================  =====
"""
import os
import stat

from .hosts import is_loopback

NODE_PORT = 51350
SCHEDULER_PORT = 51351
RELAY_PORT = 51352

SCHEDULER_ENV = "DPOOL_SCHEDULER"  # host[:port] of a dpool-scheduler
SECRET_ENV = "DPOOL_SECRET"
HOME_ENV = "DPOOL_HOME"


def dpool_home():
    """Folder for dpool's per-user state (secret files, session folders)."""
    path = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".dpool")
    os.makedirs(path, mode=0o700, exist_ok=True)
    # It holds loopback nodes' secrets: whoever owns it could swap them.
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} (the dpool home, {HOME_ENV}) is owned by uid "
                              f"{st.st_uid}, not by this user (uid {os.getuid()}): refusing "
                              f"to keep or read secrets there; choose a folder of your own")
    if st.st_mode & 0o022:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022)
    return path


def scheduler_address(host=None, port=None):
    """(host, port) of a dpool-scheduler: ``host`` ("host[:port]"), else
    ``$DPOOL_SCHEDULER``, else this host; the port defaults to 51351."""
    from .hosts import parse_address

    if host is None:
        host = os.environ.get(SCHEDULER_ENV, "").strip() or "127.0.0.1"
    found = parse_address(host, SCHEDULER_PORT)
    return (found[0], int(port)) if port else found


def resolve_cpus(cpus, total=None):
    """dispy's convention: 0/None = all CPUs, negative = leave that many free."""
    total = total or os.cpu_count() or 1
    if not cpus:
        return total
    if cpus < 0:
        return max(1, total + cpus)
    return cpus


def as_secret(secret):
    """Normalise a user-given secret (str or bytes) to bytes; None stays None."""
    if secret is None or secret == "":
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def env_secret():
    return as_secret(os.environ.get(SECRET_ENV))


def read_secret_file(path):
    with open(path, "rb") as f:
        data = f.read().strip()
    if not data:
        raise ValueError(f"secret file {path} is empty")
    return data


def generate_secret() -> bytes:
    """A strong secret: 256 random bits, URL-safe text (43 characters)."""
    import secrets

    return secrets.token_urlsafe(32).encode()


def write_new_secret_file(path, secret) -> None:
    """Write ``secret`` to a new file at ``path``, mode 0600; an existing
    file (or symbolic link) there is refused, never overwritten."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), stat.S_IRUSR | stat.S_IWUSR)
        f.write(secret + b"\n")


def local_secret_path(port):
    return os.path.join(dpool_home(), f"node-{port}.secret")


def write_local_secret(port, secret):
    """Leave a loopback node's secret where local clients look (mode 0600)."""
    path = local_secret_path(port)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:  # whatever is there (a stale file, a planted link) is never written through
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    write_new_secret_file(tmp, secret)
    os.replace(tmp, path)
    return path


def find_local_secret(port):
    """What a local client uses to talk to a loopback node with no secret given."""
    try:
        return read_secret_file(local_secret_path(port))
    except (FileNotFoundError, ValueError):
        return None


def secret_for(secret, addresses, client_cert=False):
    """The secret to use with the nodes at ``addresses`` ((host, port) pairs).

    The one given (str or bytes), else ``DPOOL_SECRET``, else, when every
    node is on this host, the secret such nodes leave in ``dpool_home()``,
    else, with a client certificate (``client_cert``), none (``b""``: mutual
    TLS authenticates both sides).
    """
    secret = as_secret(secret) or env_secret()
    if secret:
        return secret
    if all(is_loopback(host) for host, _ in addresses):
        found = {find_local_secret(port) for _, port in addresses}
        if len(found) == 1 and None not in found:
            return found.pop()
    if client_cert:
        return b""
    raise ValueError("a secret is needed to talk to dpool nodes: pass secret=... or set "
                     "DPOOL_SECRET (nodes on this host also leave it in ~/.dpool)")


def discovery_secret(secret, port):
    """The secret of a client that finds its nodes by discovery: the one
    given, else ``DPOOL_SECRET``, else the one a node on this host at
    ``port`` left in ``dpool_home()``."""
    secret = as_secret(secret) or env_secret() or find_local_secret(port)
    if secret:
        return secret
    raise ValueError("finding nodes by discovery needs the nodes' secret: pass secret=... or "
                     "set DPOOL_SECRET")
