"""What the daemons (``dpool-node``, ``dpool-scheduler``, ``dpool-relay``)
share: their parser's common options, logging set-up, and the SIGTERM-drains,
SIGINT-stops signal handling."""
import argparse
import asyncio
import importlib.metadata
import logging
import signal

from .. import serialize

log = logging.getLogger("dpool")


def port(text):
    """An argparse type: a port number, 0 to 65535."""
    try:
        number = int(text)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:  # getaddrinfo would wrap it around silently
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (0 to 65535)")
    return number


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def size(text):
    """An argparse type: a byte count, an integer with an optional K, M or G
    suffix (powers of 1024)."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    try:
        value = int(text[:len(text) - len(unit)]) * _UNITS[unit]
    except (KeyError, ValueError):
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a size in bytes (e.g. 512M, 2G)")
    return value


def add_receive_budget(p, who):
    p.add_argument("--receive-budget", type=size, default=None, metavar="BYTES",
                   help=f"bytes of partly received messages the {who} holds across all "
                        "connections before it stops reading from all but one "
                        "(backpressure); K, M, G suffixes (default 1G)")


def version():
    try:
        return importlib.metadata.version("dpool")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def new_parser(prog, doc):
    """A daemon's parser, described by the first paragraph of its module's docstring."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0].replace("``", ""))


def add_loglevel(p):
    p.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)")


def add_logfile(p):
    p.add_argument("--logfile", metavar="PATH", help="log to this file (default: stderr)")


def add_version(p):
    versions = serialize.runtime_versions()
    p.add_argument("--version", action="version",
                   version=f"{p.prog} {version()} (Python {versions['python']}, "
                           f"cloudpickle {versions['cloudpickle']})")


def start_logging(args):
    logging.basicConfig(level=getattr(logging, args.loglevel.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        filename=args.logfile)


def drain_signals():
    """(stop, drain) events: the first SIGTERM sets drain, a second one (or
    SIGINT) sets stop.  Call in the running loop."""
    stop, drain = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigterm():
        (stop if drain.is_set() else drain).set()
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    return stop, drain


async def until_first(*coros):
    """Run the coroutines until one ends; cancel the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()


async def serve_until_stopped(service, grace, stop, drain):
    """Serve until ``stop`` (SIGINT, a second SIGTERM); ``drain`` (the first
    SIGTERM) drains ``service`` for up to ``grace`` s first; then close it."""
    try:
        await until_first(stop.wait(), drain.wait())
        if not stop.is_set():
            log.info("SIGTERM: draining (a second SIGTERM or SIGINT stops at once)")
            await until_first(stop.wait(), service.drain(grace))
        if stop.is_set():
            log.info("stopping now")
    finally:
        await service.close()
