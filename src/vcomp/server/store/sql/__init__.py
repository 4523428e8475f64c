"""The job store's SQL, shared by every SQL backend: the repositories (agents, catalog,
leases, replicas, results, uploads), composed by :class:`~.store.SqlStore`, over the
:class:`~.database.Database`, :class:`~.database.Dialect` and :class:`~.database.Blobs`
a backend provides."""
