"""The example programs of the Python docs' concurrent.futures and
multiprocessing pages (the HTML of Debian's python3.11-doc, 3.11.2, which
fetch_suites.sh unpacks) that make a ``ProcessPoolExecutor`` or a ``Pool``
and run as a program (``if __name__ == '__main__'``), each run twice: as it
is, on the stdlib, and with ``import docs_examples_patch`` put first (so
``multiprocessing.Pool`` and ``concurrent.futures.ProcessPoolExecutor`` are
dpool's).  Their outputs are compared line by line, sorted (pool workers'
order varies, as do their PIDs, workers' numbers and the timeout loops'
dots: those are masked), and the
last line of stderr (an example may end in an exception on purpose).

usage: python tools/conformance/run_docs_examples.py [local|remote]
"""
import html.parser
import os
import re
import subprocess
import sys

import _harness

HTML = os.path.join(_harness.SUITES, "python3.11-doc", "usr", "share", "doc",
                    "python3.11", "html", "library")
RUN = os.path.join(_harness.SUITES, "docs_examples_run")
PAGES = ["concurrent.futures", "multiprocessing"]


class _Blocks(html.parser.HTMLParser):
    """The text of every <pre> of a page."""

    def __init__(self):
        super().__init__()
        self.blocks, self._block = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self._block = []

    def handle_endtag(self, tag):
        if tag == "pre" and self._block is not None:
            self.blocks.append("".join(self._block))
            self._block = None

    def handle_data(self, data):
        if self._block is not None:
            self._block.append(data)


def examples():
    """(name, program text) of the pages' pool programs."""
    for page in PAGES:
        parser = _Blocks()
        with open(os.path.join(HTML, page + ".html")) as f:
            parser.feed(f.read())
        for i, block in enumerate(parser.blocks):
            if "Pool" in block and "__main__" in block and ">>>" not in block:
                yield f"{page.replace('.', '_')}_{i}", block


def normalized(out):
    """The lines, sorted, with what varies from run to run masked: PIDs,
    pool workers' numbers, the progress dots of the timeout loops."""
    masks = [(r"\b\d{4,7}\b", "N"), (r"PoolWorker-\d+", "PoolWorker-N"), (r"\.+$", "")]
    lines = out.splitlines()
    for pattern, mask in masks:
        lines = [re.sub(pattern, mask, line) for line in lines]
    return sorted(lines)


def run(path):
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True,
                          timeout=300, cwd=RUN)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, normalized(proc.stdout), last


def main(mode):
    os.makedirs(RUN, exist_ok=True)
    failed = 0
    for name, text in examples():
        paths = {}
        for kind, head in (("stdlib", ""), ("dpool", "import docs_examples_patch  # noqa\n")):
            paths[kind] = os.path.join(RUN, f"{name}_{kind}.py")
            with open(paths[kind], "w") as f:
                f.write(head + text)
        ref, got = run(paths["stdlib"]), run(paths["dpool"])
        same = ref == got
        failed += not same
        print(f"{name}: {'same' if same else 'DIFFERENT'} (rc {ref[0]} / {got[0]}; "
              f"stderr's last line: {got[2]!r})", flush=True)
        if not same:
            print("  stdlib:", ref, "\n  dpool: ", got)
    print(f"MODE {mode}: {failed} different")
    return failed


if __name__ == "__main__":
    MODE = sys.argv[1] if len(sys.argv) > 1 else "local"
    _harness.use_paths()
    with _harness.nodes(MODE):
        sys.exit(main(MODE) and 1)
