"""The one TPM interface the agent uses, and how ``agent.toml`` names a backend.

Backends: ``simulated`` (:class:`~vcomp.agent.tpm.SimulatedTpm`, state in files, the
default, needs nothing installed), ``swtpm:HOST:PORT`` and ``device[:PATH]``
(:class:`~vcomp.agent.tss_tpm.TssTpm`, a real TPM 2.0 through the TSS's ``tpm2-pytss``
binding, installed with the ``tpm`` extra).

Each backend says which PCRs its measured launch extends: 17+18 (the DRTM PCRs) for
the simulation, the resettable PCR 23 for a real TPM, where 17 and 18 need locality 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp.errors import ConfigError, VcompError
from vcomp.protocol import tpm_format as tf

SIMULATED = "simulated"
SIMULATED_PCRS = (17, 18)  # PCR 17: agent code, PCR 18: sandbox policy
TSS_PCRS = (23,)  # resettable at locality 0: code, then policy, extended in turn
DEFAULT_DEVICE = "/dev/tpmrm0"


class Tpm(Protocol):
    """What the agent needs from a TPM: an AK that never leaves it, PCRs, quotes, sealing."""

    agent_id: bytes
    ak_public_key: rsa.RSAPublicKey
    ak_spki_der: bytes
    ak_name: bytes

    @property
    def measured_pcrs(self) -> tuple[int, ...]: ...

    def reset_measured_pcrs(self) -> None: ...

    def read_pcr(self, index: int) -> bytes: ...

    def extend(self, index: int, measurement: bytes) -> bytes: ...

    def clock_info(self, now: float | None = None) -> tf.ClockInfo: ...

    def quote(
        self, qualifying_data: bytes, pcrs: Sequence[int], now: float | None = None
    ) -> tuple[bytes, bytes, list[bytes]]: ...

    def seal(self, data: bytes) -> bytes: ...

    def unseal(self, blob: bytes) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TpmSpec:
    """A parsed ``--tpm`` value: ``kind`` is simulated, swtpm or device."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> TpmSpec:
        kind, _, rest = text.strip().partition(":")
        if kind == SIMULATED and not rest:
            return cls(SIMULATED)
        if kind == "device":
            path = rest or DEFAULT_DEVICE
            if not path.startswith("/") or any(c in path for c in ",= \n"):
                raise ConfigError(f"tpm device must be an absolute path: {path!r}")
            return cls("device", path=path)
        if kind == "swtpm":
            host, _, port = rest.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65535:
                raise ConfigError(f"tpm must look like swtpm:HOST:PORT: {text!r}")
            if any(c in host for c in ",= \n"):
                raise ConfigError(f"bad swtpm host {host!r}")
            return cls("swtpm", host=host, port=int(port))
        raise ConfigError(f"tpm must be simulated, swtpm:HOST:PORT or device[:PATH], not {text!r}")

    def format(self) -> str:
        if self.kind == "swtpm":
            return f"swtpm:{self.host}:{self.port}"
        if self.kind == "device":
            return f"device:{self.path}"
        return SIMULATED

    def tcti(self) -> tuple[str, str]:
        """(TCTI name, TCTI config) for the TSS; swtpm's control port is PORT + 1."""
        if self.kind == "swtpm":
            return "swtpm", f"host={self.host},port={self.port}"
        if self.kind == "device":
            return "device", self.path
        raise ConfigError("the simulated TPM has no TCTI")

    @property
    def measured_pcrs(self) -> tuple[int, ...]:
        return SIMULATED_PCRS if self.kind == SIMULATED else TSS_PCRS


def tpm_report(spec: TpmSpec, state_dir: Path) -> tuple[str, str]:
    """(active | unavailable | failed, reason) for ``vcomp-agent doctor``."""
    if spec.kind == SIMULATED:
        return "unavailable", (
            "simulated TPM (key in files, PCRs 17+18): quotes prove only what the agent "
            "says about itself; init --tpm swtpm:HOST:PORT or device for a real TPM"
        )
    try:
        tpm = open_tpm(spec, state_dir)
    except VcompError as exc:
        return "failed", f"{spec.format()}: {exc}"
    try:
        return "active", (
            f"{spec.format()}: AK {tpm.agent_id.hex()[:16]} inside the TPM, measured "
            f"launch in PCR {'+'.join(map(str, tpm.measured_pcrs))}"
        )
    finally:
        tpm.close()


def open_tpm(spec: TpmSpec, state_dir: Path) -> Tpm:
    """Open the backend ``spec`` names, keeping its files in ``state_dir``."""
    if spec.kind == SIMULATED:
        from vcomp.agent.tpm import SimulatedTpm

        return SimulatedTpm.open(state_dir)
    from vcomp.agent.tss_tpm import TssTpm

    return TssTpm.open(spec, state_dir)
