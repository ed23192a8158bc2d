"""dispy's web monitor, ``dispy.httpd.DispyHTTPServer``, on dpool's dashboard.

::

    import dpool as dispy
    from dpool.httpd import DispyHTTPServer    # dispy: from dispy.httpd import ...

    cluster = dispy.JobCluster(compute)
    http_server = DispyHTTPServer(cluster)     # then browse http://127.0.0.1:8181/
    ...
    cluster.wait()
    http_server.shutdown()

dispy's arguments, with one deliberate difference: ``host`` defaults to
127.0.0.1 (dispy's ``''`` listens on every interface).  Listening on any
other address needs a token (one is made when none is given; it is in
``http_server.url``).  ``DocumentRoot`` is accepted and ignored (the page
is dpool's own).  See :mod:`dpool.dashboard`.
"""
import logging
import ssl

from .dashboard import DashboardServer

__all__ = ["DispyHTTPServer"]

log = logging.getLogger("dpool.dashboard")


class DispyHTTPServer(DashboardServer):
    def __init__(self, cluster, host="127.0.0.1", port=8181, poll_sec=10, DocumentRoot=None,
                 keyfile=None, certfile=None, show_job_args=True, token=None):
        if poll_sec < 1:  # as dispy
            log.warning("invalid poll_sec value %s; it must be at least 1", poll_sec)
            poll_sec = 1
        context = None
        if certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
        super().__init__(host="0.0.0.0" if host == "" else host, port=port, poll_sec=poll_sec,
                         token=token, show_job_args=show_job_args, ssl_context=context)
        if cluster is not None:
            self.add_cluster(cluster)

    def add_cluster(self, cluster):
        """Show another cluster on the same page."""
        if any(monitor.source is cluster for monitor in self.monitors.values()):
            log.warning('Cluster "%s" is already registered', cluster.name)
            return
        self.add(cluster)

    def del_cluster(self, cluster):
        self.remove(cluster)

    def shutdown(self, wait=True):
        """Stop the server; ``wait=True`` (dispy's default) first waits
        ``poll_sec`` seconds so that browsers show the final state."""
        super().shutdown(wait)
