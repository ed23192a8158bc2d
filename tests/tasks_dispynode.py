"""dispy computations for tests/dispy/test_dispy_dropin.py, apart from
tasks.py because this module must not import os, time, socket...: a dispy
computation may use the modules dispynode imports without importing them
(dispynode runs it among its own globals), and dpool gives it the same.
"""
# ruff: noqa: F821  (dispy_* names, setup's globals and dispynode's modules are injected)


def setup_shared_counter():
    """dispy's node_shvars example: a lock and a shared value that every
    job process of the node inherits."""
    import multiprocessing
    import multiprocessing.sharedctypes

    global shvar
    lock = multiprocessing.Lock()
    shvar = multiprocessing.sharedctypes.Value("i", 0, lock=lock)
    return 0


def cleanup_shared_counter():
    global shvar
    del shvar


def bump_shared_counter(_=None):
    with shvar.get_lock():  # (shvar.value takes the same lock: use the raw value)
        raw = shvar.get_obj()
        raw.value += 1
        value = raw.value
    return value, os.getpid()


def uses_unimported_modules(x):
    return (os.getpid() > 0, time.time() > 0, socket.gethostname() != "",
            sys.version_info[0], hashlib.sha1(b"x").hexdigest()[:4], x)


def setup_uses_unimported_modules():
    global where
    where = (sys.version_info[0], os.name)
    return 0


def node_names(x):
    return x, dispy_node_name, dispy_node_ip_addr, setup_saw


def setup_sees_node_names():
    global setup_saw
    setup_saw = (dispy_node_name, dispy_node_ip_addr)
    return 0


def interruptible(started, cleaned):
    """Wait to be cancelled; on KeyboardInterrupt (dispy's cancel), clean up."""
    open(started, "w").close()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return "not cancelled"
    except KeyboardInterrupt:
        with open(cleaned, "w") as f:
            f.write("cleaned up")
        raise


def setup_with_file(name):
    global file_text
    with open(name) as f:
        file_text = f.read()
    return 0


def read_setup_file(_=None):
    return file_text


def setup_starts_a_manager():
    """setup starts a process of its own (a multiprocessing Manager): it
    must stay up while the node's workers come and go."""
    import multiprocessing

    global manager, shared
    manager = multiprocessing.Manager()
    shared = manager.list()
    return 0


def append_to_manager_list(x):
    if x == "die":
        os._exit(3)  # the worker dies; the node forks a new one from the setup process
    shared.append(x)
    return len(shared)
