"""The dispy dialect: ``JobCluster``, its job and node records, ``depends``
shipping and ``recover_jobs``, all over the core client (``dpool.core``).

``import dpool as dispy`` is the supported spelling; this package holds the
code behind it.
"""
