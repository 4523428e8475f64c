"""The organisation server's HTTP API: resources, tokens, metrics and the dashboard.

Served by ``vcomp-server serve`` on ``[http] bind`` (see :mod:`.settings`), on the same
event loop as the UDP endpoint. Blocking store calls go through the store's writer
thread (:meth:`.context.HttpContext.run`), never on the loop.
"""
