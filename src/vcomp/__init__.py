"""vcomp: volunteer computing with attested agents and a sandboxed protected domain."""

__version__ = "0.1.0"
