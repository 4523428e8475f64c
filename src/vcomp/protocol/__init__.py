"""The sans-I/O protocol core: bytes and ``now`` in; datagrams, events and timers out."""
