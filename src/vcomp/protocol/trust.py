"""What the server trusts, held in memory: enrolled keys, golden PCRs, clocks.

The application loads this from its store and writes clock updates back; the
protocol core only reads and updates it, so attestation stays free of I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp.protocol.attestation import (
    MEASURED_PCRS,
    Measurement,
    NonceBook,
    VerifiedQuote,
    verify_quote,
)
from vcomp.protocol.tpm_format import ClockInfo

ClockListener = Callable[[bytes, ClockInfo], None]


@dataclass
class TrustPolicy:
    enrolled: dict[bytes, rsa.RSAPublicKey] = field(default_factory=dict)
    allowlist: set[Measurement] = field(default_factory=set)
    clocks: dict[bytes, ClockInfo] = field(default_factory=dict)
    on_clock: ClockListener | None = None

    def verify(
        self,
        *,
        agent_id: bytes,
        quote: bytes,
        signature: bytes,
        pcr_values: Sequence[bytes],
        server_nonce: bytes,
        ephemeral_spki_der: bytes,
        nonce_book: NonceBook,
        now: float,
        requested_pcrs: Sequence[int] = MEASURED_PCRS,
        selection_from_allowlist: bool = False,
    ) -> VerifiedQuote:
        """Verify and, on success, remember the quote's clock for next time."""
        verified = verify_quote(
            ak_public_key=self.enrolled.get(agent_id),
            quote=quote,
            signature=signature,
            pcr_values=pcr_values,
            server_nonce=server_nonce,
            ephemeral_spki_der=ephemeral_spki_der,
            nonce_book=nonce_book,
            now=now,
            requested_pcrs=requested_pcrs,
            selection_from_allowlist=selection_from_allowlist,
            allowlist=self.allowlist,
            previous_clock=self.clocks.get(agent_id),
        )
        self.clocks[agent_id] = verified.clock_info
        if self.on_clock is not None:
            self.on_clock(agent_id, verified.clock_info)
        return verified
