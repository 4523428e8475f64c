"""The measured launch: PCR 17 measures the agent's code, PCR 18 its sandbox policy.

Like a DRTM launch, both PCRs start at zero and are extended exactly once, so their
values are predictable and can be allow-listed by the server as a golden measurement.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import vcomp
from vcomp.agent.tpm import SimulatedTpm, TpmError
from vcomp.errors import ConfigError
from vcomp.protocol import tpm_format as tf
from vcomp.protocol.attestation import Measurement

CODE_PCR = 17
POLICY_PCR = 18


def package_dir() -> Path:
    return Path(vcomp.__file__).resolve().parent


def code_digest(root: Path | None = None) -> bytes:
    """SHA-256 over every ``*.py`` under the package, sorted by relative POSIX path.

    Each file contributes ``path || NUL || SHA-256(content)``.
    """
    root = package_dir() if root is None else root
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py") if p.is_file())
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.digest()


def canonical_policy(policy: Mapping[str, Any]) -> bytes:
    """Sorted-key, compact, UTF-8 JSON: the same policy always gives the same bytes."""
    try:
        text = json.dumps(
            policy, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sandbox policy is not plain JSON data: {exc}") from None
    return text.encode()


def policy_digest(policy: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(canonical_policy(policy)).digest()


def golden_measurement(policy: Mapping[str, Any], code: bytes | None = None) -> Measurement:
    """The PCR 17/18 values :func:`measured_launch` yields; the server's allowlist entry."""
    code = code_digest() if code is None else code
    return Measurement.of(
        (CODE_PCR, POLICY_PCR),
        (tf.extend(tf.EMPTY_PCR, code), tf.extend(tf.EMPTY_PCR, policy_digest(policy))),
    )


def measured_launch(tpm: SimulatedTpm, policy: Mapping[str, Any]) -> Measurement:
    """Extend PCR 17 with the code digest and PCR 18 with the policy digest, once."""
    if tpm.read_pcr(CODE_PCR) != tf.EMPTY_PCR or tpm.read_pcr(POLICY_PCR) != tf.EMPTY_PCR:
        raise TpmError("measured launch already done in this TPM power cycle")
    pcr17 = tpm.extend(CODE_PCR, code_digest())
    pcr18 = tpm.extend(POLICY_PCR, policy_digest(policy))
    return Measurement.of((CODE_PCR, POLICY_PCR), (pcr17, pcr18))
