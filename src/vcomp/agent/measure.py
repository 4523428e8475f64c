"""The measured launch: PCR 17 measures the agent's code, PCR 18 its sandbox policy.

Like a DRTM launch, both PCRs start at zero and are extended exactly once, so their
values are predictable and can be allow-listed by the server as a golden measurement.
A real TPM's backend measures into one resettable PCR (23): reset, then the code digest,
then the policy digest. The golden measurement names the PCRs, so the two differ.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import vcomp
from vcomp.agent.tpm import TpmError
from vcomp.agent.tpm_backend import SIMULATED_PCRS, Tpm
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


def _plan(pcrs: Sequence[int]) -> tuple[int, int]:
    """(PCR for the code digest, PCR for the policy digest); one PCR takes both in turn."""
    if len(pcrs) == 2:
        return pcrs[0], pcrs[1]
    if len(pcrs) == 1:
        return pcrs[0], pcrs[0]
    raise TpmError(f"measured launch needs one or two PCRs, not {list(pcrs)}")


def golden_measurement(
    policy: Mapping[str, Any],
    code: bytes | None = None,
    pcrs: Sequence[int] = SIMULATED_PCRS,
) -> Measurement:
    """The values :func:`measured_launch` yields in ``pcrs``; the server's allowlist entry."""
    code = code_digest() if code is None else code
    code_pcr, policy_pcr = _plan(pcrs)
    values = dict.fromkeys(pcrs, tf.EMPTY_PCR)
    values[code_pcr] = tf.extend(values[code_pcr], code)
    values[policy_pcr] = tf.extend(values[policy_pcr], policy_digest(policy))
    return Measurement.of(tuple(values), tuple(values.values()))


def measured_launch(tpm: Tpm, policy: Mapping[str, Any]) -> Measurement:
    """Extend the TPM's measured PCRs with the code digest, then the policy digest, once."""
    pcrs = tpm.measured_pcrs
    code_pcr, policy_pcr = _plan(pcrs)
    tpm.reset_measured_pcrs()
    if any(tpm.read_pcr(i) != tf.EMPTY_PCR for i in pcrs):
        raise TpmError("measured launch already done in this TPM power cycle")
    tpm.extend(code_pcr, code_digest())
    tpm.extend(policy_pcr, policy_digest(policy))
    return Measurement.of(pcrs, [tpm.read_pcr(i) for i in pcrs])
