"""The results a dpool-scheduler passes on to one client: the nodes' Done
messages read in one pass of the loop go as one (see
:class:`dpool.core.broker.ClientSession`)."""
from __future__ import annotations

from typing import Any

from .. import protocol as P
from ..transport.frames import _nbytes
from ..transport.streams import after_pass

#: The nodes' Done messages of one pass merged into one for a client
#: (ResultMerge.flush) while it has at most this many frames and bytes;
#: one past them goes alone, as it came.  Well within the client's Limits
#: (transport.frames: max_frames, max_message_bytes), which each node's
#: message is within but several merged need not be; merging large
#: results saves nothing.
MERGE_MAX_FRAMES = 4096
MERGE_MAX_BYTES = 1 << 20


class ResultMerge:
    """One client's results and starts from the nodes, not passed on yet."""

    def __init__(self, session: Any) -> None:
        self.session = session  # a ClientSession: its _tell sends (or keeps) a message
        # Done messages from the nodes not passed on yet: (results, frames)
        # each; those of one pass of the loop go to the client as one (flush).
        self.out: list[tuple[list, list]] = []
        self.starts: list[tuple] = []  # Started entries to pass on with them (flush)

    def done(self, results: list, frames: list) -> None:
        """A node's Done: passed on at the end of this pass."""
        if not self.out and not self.starts:
            after_pass(self.flush)
        self.out.append((results, frames))

    def started(self, jobs: list, host: str) -> None:
        """Jobs started on a node: passed on with the pass's results (flush),
        one Started message ahead of their Done, not one per node's notice
        (which would also split the pass's Done)."""
        if not self.out and not self.starts:
            after_pass(self.flush)
        self.starts += [(job[0], job[1], host) for job in jobs]

    def flush(self) -> None:
        """Pass on the results that came from the nodes in the last pass of
        the loop: one Done message for them all (as the node sent it, if it
        is the only one), so that the client reads one message, not one per
        node (the scheduler's share of the path's CPU per job)."""
        out, self.out = self.out, []
        starts, self.starts = self.starts, []
        if self.session.ended:
            return
        messages: list[list] = []
        if starts:  # (before any Done: a job's start comes before its result)
            messages.append([P.encode(P.Started, starts)])
        merged: list[tuple[list, list]] = []
        nframes = nbytes = 0
        for records, frames in out:
            size = sum(map(_nbytes, frames))
            if merged and (nframes + len(frames) > MERGE_MAX_FRAMES
                           or nbytes + size > MERGE_MAX_BYTES):
                messages.append(self._merged(merged))
                merged, nframes, nbytes = [], 0, 0
            merged.append((records, frames))
            nframes += len(frames)
            nbytes += size
        if merged:
            messages.append(self._merged(merged))
        if messages:  # (the Started and the Done of a pass: one write)
            self.session._tell_all(messages)

    def _merged(self, out: list[tuple[list, list]]) -> list:
        """One Done for ``out`` (the node's own message if it is alone)."""
        if len(out) == 1:
            return out[0][1]
        results: list = []
        payload: list = []
        for records, frames in out:
            results += records
            payload += frames[1:]
        return [P.encode(P.Done, results), *payload]
