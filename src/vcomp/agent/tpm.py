"""A simulated TPM 2.0 kept in a state directory: AK, PCR bank, clock, quotes and sealing.

Files in the state directory (created 0700):

* ``ak.pem``      RSA-2048 attestation key, PKCS#8 PEM, unencrypted, mode 0600
* ``seed.bin``    32-byte storage-root seed that sealing keys derive from, mode 0600
* ``counters.json`` creation time, resetCount, restartCount and the clock floor

Opening the TPM is a simulated power cycle: resetCount goes up by one and every PCR
starts at zero. Quotes use the real TPMS_ATTEST / TPMT_SIGNATURE encodings. Key
material is never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vcomp.errors import ConfigError, DecodeError, VcompError
from vcomp.protocol import attestation
from vcomp.protocol import tpm_format as tf

if TYPE_CHECKING:
    from vcomp.agent.tpm_backend import Tpm

AK_FILE = "ak.pem"
SEED_FILE = "seed.bin"
COUNTERS_FILE = "counters.json"
LOCK_FILE = ".lock"
SEED_SIZE = 32
FIRMWARE_VERSION = 0x0000_0001_0000_0000  # simulated firmware 1.0 (major << 32)
SEAL_MAGIC = b"VCSL"
SEAL_VERSION = 1
MAX_SEALED_SIZE = 64 * 1024  # seal a key, not a payload (a real TPM takes 128 bytes)
_SEAL_HEADER = struct.Struct(">4sB10s32s16s12s")  # magic ver selection policy salt nonce


class TpmError(VcompError):
    """The simulated TPM refused an operation."""


class UnsealError(TpmError):
    """A sealed blob could not be opened; ``reason`` is policy_mismatch, integrity or malformed."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def default_state_dir() -> Path:
    home = os.environ.get("VCOMP_AGENT_HOME", "~/.vcomp-agent")
    return Path(home).expanduser() / "tpm"


def _write_private(path: Path, data: bytes) -> None:
    """Create a new 0600 file; never widen permissions of an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_private(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} is readable by group or others; expected mode 0600")
    return path.read_bytes()


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _write_private(tmp, data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class SimulatedTpm:
    """One power cycle of the simulated TPM. Create it with :meth:`open`."""

    def __init__(
        self,
        state_dir: Path,
        ak: rsa.RSAPrivateKey,
        seed: bytes,
        created_at: float,
        reset_count: int,
        restart_count: int,
        clock_floor: int,
    ) -> None:
        self.state_dir = state_dir
        self._ak = ak
        self._seed = seed
        self._created_at = created_at
        self.reset_count = reset_count
        self.restart_count = restart_count
        self._last_clock = clock_floor
        self._pcrs = [tf.EMPTY_PCR] * tf.PCR_COUNT
        self.ak_public_key = ak.public_key()
        self.ak_spki_der = attestation.spki_der(self.ak_public_key)
        self.agent_id = attestation.agent_id(self.ak_spki_der)
        self.ak_name = attestation.ak_name(self.ak_public_key)

    def __repr__(self) -> str:
        return f"SimulatedTpm({str(self.state_dir)!r}, reset_count={self.reset_count})"

    @classmethod
    def open(cls, state_dir: Path | str, *, now: float | None = None) -> SimulatedTpm:
        """Load (creating on first use) the TPM in ``state_dir``; counts one TPM reset."""
        now = time.time() if now is None else now
        state_dir = Path(state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(state_dir):
            ak = cls._load_or_create_ak(state_dir / AK_FILE)
            seed_path = state_dir / SEED_FILE
            if not seed_path.exists():
                _write_private(seed_path, os.urandom(SEED_SIZE))
            seed = _read_private(seed_path)
            if len(seed) != SEED_SIZE:
                raise ConfigError(f"{seed_path} is not {SEED_SIZE} bytes")

            counters_path = state_dir / COUNTERS_FILE
            if counters_path.exists():
                try:
                    c = json.loads(counters_path.read_text())
                    created_at = float(c["created_at"])
                    reset_count = int(c["reset_count"]) + 1
                    restart_count = int(c["restart_count"])
                    floor = int(c["clock"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(f"{counters_path} is corrupt: {exc}") from None
            else:
                created_at, reset_count, restart_count, floor = now, 0, 0, 0
            # Clock persists across resets and never runs backwards, even if the host
            # clock does.
            clock = max(floor, int((now - created_at) * 1000))
            counters = {
                "created_at": created_at,
                "reset_count": reset_count,
                "restart_count": restart_count,
                "clock": clock,
            }
            _replace_atomically(counters_path, json.dumps(counters).encode())
        return cls(state_dir, ak, seed, created_at, reset_count, restart_count, clock)

    @staticmethod
    def _load_or_create_ak(path: Path) -> rsa.RSAPrivateKey:
        if not path.exists():
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_private(path, pem)
        loaded = serialization.load_pem_private_key(_read_private(path), password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey) or loaded.key_size != 2048:
            raise ConfigError(f"{path} is not an RSA-2048 private key")
        return loaded

    # ------------------------------------------------------------ PCRs and clock

    @property
    def measured_pcrs(self) -> tuple[int, ...]:
        return attestation.MEASURED_PCRS

    def reset_measured_pcrs(self) -> None:
        """PCR 17 and 18 reset only in a DRTM launch; here that is :meth:`open`."""

    def close(self) -> None:
        """Nothing to release: every change is already in the state directory."""

    def read_pcr(self, index: int) -> bytes:
        return self._pcrs[index]

    def extend(self, index: int, measurement: bytes) -> bytes:
        """TPM2_PCR_Extend on the SHA-256 bank; ``measurement`` is a 32-byte digest."""
        if not 0 <= index < tf.PCR_COUNT:
            raise TpmError(f"no PCR {index}")
        if len(measurement) != tf.SHA256_SIZE:
            raise TpmError("a SHA-256 bank extend takes a 32-byte digest")
        self._pcrs[index] = tf.extend(self._pcrs[index], measurement)
        return self._pcrs[index]

    def clock_info(self, now: float | None = None) -> tf.ClockInfo:
        now = time.time() if now is None else now
        self._last_clock = max(self._last_clock, int((now - self._created_at) * 1000))
        return tf.ClockInfo(self._last_clock, self.reset_count, self.restart_count, True)

    # ------------------------------------------------------------ quote

    def quote(
        self, qualifying_data: bytes, pcrs: Sequence[int], now: float | None = None
    ) -> tuple[bytes, bytes, list[bytes]]:
        """TPM2_Quote: (TPMS_ATTEST bytes, TPMT_SIGNATURE bytes, selected PCR values)."""
        if len(qualifying_data) > tf.MAX_DATA_SIZE:
            raise TpmError(f"qualifying data longer than {tf.MAX_DATA_SIZE} bytes")
        selection = tf.PcrSelection.sha256(pcrs)
        values = [self._pcrs[i] for i in selection.pcrs]
        attest = tf.encode_attest(
            tf.Attest(
                magic=tf.TPM_GENERATED_VALUE,
                type=tf.TPM_ST_ATTEST_QUOTE,
                qualified_signer=self.ak_name,
                extra_data=qualifying_data,
                clock_info=self.clock_info(now),
                firmware_version=FIRMWARE_VERSION,
                pcr_select=(selection,),
                pcr_digest=tf.pcr_digest(values),
            )
        )
        sig = self._ak.sign(attest, padding.PKCS1v15(), hashes.SHA256())
        return attest, tf.encode_signature(tf.RsassaSignature(tf.TPM_ALG_SHA256, sig)), values

    # ------------------------------------------------------------ sealing

    def _policy_now(self, selection: tf.PcrSelection) -> bytes:
        values = [self._pcrs[i] for i in selection.pcrs]
        return tf.policy_pcr_digest((selection,), tf.pcr_digest(values))

    def _data_key(self, salt: bytes, policy: bytes) -> bytes:
        hkdf = HKDF(hashes.SHA256(), 32, salt, b"vcomp seal v1" + policy)
        return hkdf.derive(self._seed)

    def seal(self, data: bytes, pcrs: Sequence[int] = attestation.MEASURED_PCRS) -> bytes:
        """Seal ``data`` to the current values of ``pcrs`` (a PolicyPCR policy)."""
        if len(data) > MAX_SEALED_SIZE:
            raise TpmError(f"cannot seal more than {MAX_SEALED_SIZE} bytes")
        selection = tf.PcrSelection.sha256(pcrs)
        policy = self._policy_now(selection)
        salt, nonce = os.urandom(16), os.urandom(12)
        header = _SEAL_HEADER.pack(
            SEAL_MAGIC, SEAL_VERSION, tf.encode_pcr_selection((selection,)), policy, salt, nonce
        )
        return header + AESGCM(self._data_key(salt, policy)).encrypt(nonce, data, header)

    def unseal(self, blob: bytes) -> bytes:
        """Open a sealed blob if the PCRs it was sealed to still hold the same values."""
        if len(blob) < _SEAL_HEADER.size + 16 or len(blob) > (
            _SEAL_HEADER.size + MAX_SEALED_SIZE + 16
        ):
            raise UnsealError("malformed", "sealed blob has an impossible length")
        magic, version, sel_bytes, sealed_policy, salt, nonce = _SEAL_HEADER.unpack_from(blob)
        if magic != SEAL_MAGIC or version != SEAL_VERSION:
            raise UnsealError("malformed", "not a vcomp sealed blob")
        try:
            (selection,) = tf.decode_pcr_selection(sel_bytes)
        except (DecodeError, ValueError):
            raise UnsealError("malformed", "bad PCR selection in sealed blob") from None
        if selection.hash_alg != tf.TPM_ALG_SHA256:
            raise UnsealError("malformed", "sealed to a PCR bank this TPM does not have")
        policy = self._policy_now(selection)
        if not hmac.compare_digest(policy, sealed_policy):
            raise UnsealError(
                "policy_mismatch",
                f"PCRs {list(selection.pcrs)} changed since the data was sealed",
            )
        # The key comes from the policy recomputed now, so editing the stored digest
        # cannot help: the wrong key fails the tag check.
        try:
            return AESGCM(self._data_key(salt, policy)).decrypt(
                nonce, blob[_SEAL_HEADER.size :], blob[: _SEAL_HEADER.size]
            )
        except InvalidTag:
            raise UnsealError("integrity", "sealed blob was modified") from None


def write_quote_files(
    tpm: Tpm,
    qualifying_data: bytes,
    out_dir: Path | str,
    pcrs: Sequence[int] | None = None,
) -> None:
    """Write a quote as tpm2-tools expects it, for ``tpm2_checkquote``.

    ak.pub.pem (SPKI PEM), quote.msg (TPMS_ATTEST), quote.sig (TPMT_SIGNATURE),
    pcrs.bin (selected values concatenated, like ``tpm2_pcrread -o``), pcr-list.txt.
    """
    pcrs = tpm.measured_pcrs if pcrs is None else pcrs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attest, sig, values = tpm.quote(qualifying_data, pcrs)
    pem = tpm.ak_public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (out / "ak.pub.pem").write_bytes(pem)
    (out / "quote.msg").write_bytes(attest)
    (out / "quote.sig").write_bytes(sig)
    (out / "pcrs.bin").write_bytes(b"".join(values))
    selection = tf.PcrSelection.sha256(pcrs)
    (out / "pcr-list.txt").write_text("sha256:" + ",".join(map(str, selection.pcrs)) + "\n")
