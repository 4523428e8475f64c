"""The organisation server: job store, scheduler and UDP endpoint."""
