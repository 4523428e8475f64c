"""A real TPM 2.0 (swtpm or a device) through the TSS's ESAPI, via ``tpm2-pytss``.

The attestation key is a restricted RSA-2048 RSASSA-SHA256 signing key created by the
TPM under the owner hierarchy's storage root key (SRK, the standard RSA-2048/AES-128
template, re-derived from the owner seed on every open). Its private part leaves the
TPM only wrapped by the SRK; files in the state directory:

* ``tss-ak.pub``   TPM2B_PUBLIC of the AK
* ``tss-ak.priv``  TPM2B_PRIVATE of the AK, encrypted by the SRK (useless off this TPM)

The AK's template is the one :func:`vcomp.protocol.tpm_format.encode_rsa_ak_public`
describes, so the server computes the same Name and verifies quotes unchanged.

Measured launch uses PCR 23: the PC Client profile lets locality 0 reset it, so the
agent can start it from zero like a DRTM launch does for 17+18. Sealing creates a TPM
keyedhash object bound by PolicyPCR to the measured PCRs; the TPM itself refuses to
unseal it after they change.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp.agent.tpm import TpmError, UnsealError, _write_private
from vcomp.agent.tpm_backend import TpmSpec
from vcomp.errors import ConfigError
from vcomp.protocol import attestation
from vcomp.protocol import tpm_format as tf

try:
    from tpm2_pytss import (
        ESAPI,
        ESYS_TR,
        TPM2B_DIGEST,
        TPM2B_PRIVATE,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPM2B_SENSITIVE_DATA,
        TPML_DIGEST_VALUES,
        TPML_PCR_SELECTION,
        TPMT_HA,
        TPMT_SIG_SCHEME,
        TPMU_HA,
        TCTILdr,
        TSS2_Exception,
    )
    from tpm2_pytss.constants import TPM2_ALG, TPM2_CAP, TPM2_HT, TPM2_SE

    TSS_IMPORT_ERROR = ""
except ImportError as exc:  # the `tpm` extra is optional; the simulated TPM needs none of it
    TSS_IMPORT_ERROR = str(exc)

AK_PUBLIC_FILE = "tss-ak.pub"
AK_PRIVATE_FILE = "tss-ak.priv"
SRK_TEMPLATE = "rsa2048:aes128cfb"
SRK_ATTRIBUTES = "userwithauth|restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|noda"
AK_TEMPLATE = "rsa2048:rsassa-sha256:null"
AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
SEALED_ATTRIBUTES = "fixedtpm|fixedparent|noda"
SEAL_MAGIC = b"VCTS"
MAX_SEALED_SIZE = 128  # MAX_SYM_DATA: a TPM seals a key, not a payload
MAX_BLOB_PART = 4096  # a TPM2B_PUBLIC or TPM2B_PRIVATE is far below this
RESETTABLE_PCRS = frozenset({16, 23})  # PC Client profile: locality 0 may reset these


def _selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(i) for i in sorted(set(pcrs))))


def _pcr_handle(index: int) -> ESYS_TR:
    if not 0 <= index < tf.PCR_COUNT:
        raise TpmError(f"no PCR {index}")
    return ESYS_TR(getattr(ESYS_TR, f"PCR{index}"))


class TssTpm:
    """A session with a real TPM. Create it with :meth:`open`; :meth:`close` when done."""

    def __init__(self, spec: TpmSpec, state_dir: Path, esys: ESAPI, ak: ESYS_TR) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self._esys = esys
        self._ak = ak
        self._closed = False
        public = TPM2B_PUBLIC.unmarshal((state_dir / AK_PUBLIC_FILE).read_bytes())[0]
        modulus = bytes(public.publicArea.unique.rsa)
        self.ak_public_key = rsa.RSAPublicNumbers(
            65537, int.from_bytes(modulus, "big")
        ).public_key()
        self.ak_spki_der = attestation.spki_der(self.ak_public_key)
        self.agent_id = attestation.agent_id(self.ak_spki_der)
        self.ak_name = attestation.ak_name(self.ak_public_key)
        if bytes(public.get_name().marshal())[2:] != self.ak_name:
            raise ConfigError(f"{state_dir / AK_PUBLIC_FILE} is not an AK of the vcomp template")

    def __repr__(self) -> str:
        return f"TssTpm({self.spec.format()!r})"

    @classmethod
    def open(cls, spec: TpmSpec, state_dir: Path | str) -> TssTpm:
        """Connect, then load the AK (creating it inside the TPM on first use)."""
        if TSS_IMPORT_ERROR:
            raise ConfigError(
                f"--tpm {spec.format()} needs tpm2-pytss (pip install 'vcomp[tpm]'): "
                f"{TSS_IMPORT_ERROR}"
            )
        state_dir = Path(state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            esys = ESAPI(TCTILdr(*spec.tcti()))
        except TSS2_Exception as exc:
            raise TpmError(f"cannot reach the TPM at {spec.format()}: {exc}") from None
        try:
            if spec.kind == "swtpm":
                _flush_transients(esys)  # no resource manager in front of swtpm
            ak = _load_ak(esys, state_dir)
            return cls(spec, state_dir, esys, ak)
        except TSS2_Exception as exc:
            esys.close()
            raise TpmError(f"TPM at {spec.format()} refused to load the AK: {exc}") from None
        except BaseException:
            esys.close()
            raise

    def close(self) -> None:
        """Unload the AK and disconnect; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TSS2_Exception):
            self._esys.flush_context(self._ak)
        self._esys.close()

    # ------------------------------------------------------------ PCRs and clock

    @property
    def measured_pcrs(self) -> tuple[int, ...]:
        return self.spec.measured_pcrs

    def reset_measured_pcrs(self) -> None:
        for index in self.measured_pcrs:
            if index not in RESETTABLE_PCRS:
                raise TpmError(f"PCR {index} cannot be reset at locality 0")
            self._call("PCR_Reset", self._esys.pcr_reset, _pcr_handle(index))

    def read_pcr(self, index: int) -> bytes:
        _, _, values = self._call("PCR_Read", self._esys.pcr_read, _selection([index]))
        digests = [bytes(d) for d in values.digests]
        if len(digests) != 1:
            raise TpmError(f"TPM has no SHA-256 PCR {index}")
        return digests[0]

    def extend(self, index: int, measurement: bytes) -> bytes:
        if len(measurement) != tf.SHA256_SIZE:
            raise TpmError("a SHA-256 bank extend takes a 32-byte digest")
        digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=measurement))
        self._call(
            "PCR_Extend", self._esys.pcr_extend, _pcr_handle(index), TPML_DIGEST_VALUES([digest])
        )
        return self.read_pcr(index)

    def clock_info(self, now: float | None = None) -> tf.ClockInfo:
        info = self._call("ReadClock", self._esys.read_clock).clockInfo
        return tf.ClockInfo(
            int(info.clock), int(info.resetCount), int(info.restartCount), bool(info.safe)
        )

    # ------------------------------------------------------------ quote

    def quote(
        self, qualifying_data: bytes, pcrs: Sequence[int], now: float | None = None
    ) -> tuple[bytes, bytes, list[bytes]]:
        """TPM2_Quote by the AK: (TPMS_ATTEST, TPMT_SIGNATURE, the selected PCR values)."""
        if len(qualifying_data) > tf.MAX_DATA_SIZE:
            raise TpmError(f"qualifying data longer than {tf.MAX_DATA_SIZE} bytes")
        selection = _selection(pcrs)
        attest, signature = self._call(
            "Quote",
            self._esys.quote,
            self._ak,
            selection,
            qualifying_data,
            TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
        )
        quoted = bytes(attest.marshal())[2:]  # TPM2B_ATTEST -> TPMS_ATTEST
        values = [self.read_pcr(i) for i in sorted(set(pcrs))]
        # A PCR may have changed between Quote and PCR_Read; the server would reject the
        # mismatch, so say so here instead.
        if tf.decode_attest(quoted).pcr_digest != tf.pcr_digest(values):
            raise TpmError("PCRs changed while quoting; quote again")
        return quoted, bytes(signature.marshal()), values

    # ------------------------------------------------------------ sealing

    def seal(self, data: bytes) -> bytes:
        """Seal ``data`` in a TPM object that only PolicyPCR on the measured PCRs opens."""
        if len(data) > MAX_SEALED_SIZE:
            raise TpmError(f"a TPM seals at most {MAX_SEALED_SIZE} bytes")
        values = [self.read_pcr(i) for i in self.measured_pcrs]
        selection = (tf.PcrSelection.sha256(self.measured_pcrs),)
        policy = tf.policy_pcr_digest(selection, tf.pcr_digest(values))
        template = TPM2B_PUBLIC.parse("keyedhash", objectAttributes=SEALED_ATTRIBUTES)
        template.publicArea.authPolicy = TPM2B_DIGEST(policy)
        sensitive = TPM2B_SENSITIVE_CREATE()
        sensitive.sensitive.data = TPM2B_SENSITIVE_DATA(data)
        srk = _create_srk(self._esys)
        try:
            private, public, *_ = self._call("Create", self._esys.create, srk, sensitive, template)
        finally:
            self._esys.flush_context(srk)
        pub, priv = bytes(public.marshal()), bytes(private.marshal())
        return SEAL_MAGIC + struct.pack(">HH", len(pub), len(priv)) + pub + priv

    def unseal(self, blob: bytes) -> bytes:
        if len(blob) < 8 or blob[:4] != SEAL_MAGIC:
            raise UnsealError("malformed", "not a vcomp TPM sealed blob")
        pub_len, priv_len = struct.unpack_from(">HH", blob, 4)
        if (
            pub_len > MAX_BLOB_PART
            or priv_len > MAX_BLOB_PART
            or len(blob) != 8 + pub_len + priv_len
        ):
            raise UnsealError("malformed", "sealed blob has an impossible length")
        try:
            public = TPM2B_PUBLIC.unmarshal(blob[8 : 8 + pub_len])[0]
            private = TPM2B_PRIVATE.unmarshal(blob[8 + pub_len :])[0]
        except TSS2_Exception:
            raise UnsealError("malformed", "sealed blob does not parse") from None
        srk = _create_srk(self._esys)
        try:
            obj = self._esys.load(srk, private, public)
        except TSS2_Exception:
            raise UnsealError("integrity", "the TPM refused the sealed object") from None
        finally:
            self._esys.flush_context(srk)
        session = self._esys.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, "aes128cfb", TPM2_ALG.SHA256
        )
        try:
            self._esys.policy_pcr(session, TPM2B_DIGEST(), _selection(self.measured_pcrs))
            return bytes(self._esys.unseal(obj, session1=session))
        except TSS2_Exception:
            raise UnsealError(
                "policy_mismatch", f"PCRs {list(self.measured_pcrs)} changed since sealing"
            ) from None
        finally:
            with contextlib.suppress(TSS2_Exception):
                self._esys.flush_context(session)
            self._esys.flush_context(obj)

    def _call(self, what: str, fn: Callable[..., Any], *args: object) -> Any:
        try:
            return fn(*args)
        except TSS2_Exception as exc:
            raise TpmError(f"TPM2_{what} failed: {exc}") from None


def _flush_transients(esys: ESAPI) -> None:
    """Flush transient objects a killed earlier run left loaded (swtpm has no RM)."""
    _, data = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
    for handle in data.data.handles:
        with contextlib.suppress(TSS2_Exception):
            esys.flush_context(esys.tr_from_tpmpublic(handle))


def _create_srk(esys: ESAPI) -> ESYS_TR:
    template = TPM2B_PUBLIC.parse(SRK_TEMPLATE, objectAttributes=SRK_ATTRIBUTES)
    handle, *_ = esys.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
    return handle


def _load_ak(esys: ESAPI, state_dir: Path) -> ESYS_TR:
    pub_path, priv_path = state_dir / AK_PUBLIC_FILE, state_dir / AK_PRIVATE_FILE
    srk = _create_srk(esys)
    try:
        if not pub_path.exists():
            template = TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES)
            private, public, *_ = esys.create(srk, TPM2B_SENSITIVE_CREATE(), template)
            _write_private(priv_path, bytes(private.marshal()))
            _write_private(pub_path, bytes(public.marshal()))
        public = TPM2B_PUBLIC.unmarshal(pub_path.read_bytes())[0]
        private = TPM2B_PRIVATE.unmarshal(priv_path.read_bytes())[0]
        return esys.load(srk, private, public)
    finally:
        esys.flush_context(srk)


__all__ = ["TSS_IMPORT_ERROR", "TssTpm"]
