"""A real software TPM for tests: ``swtpm socket --tpm2`` on free loopback ports.

Tests that need it skip, printing why, only when swtpm or tpm2-pytss is missing
(``.ci/run`` installs both).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vcomp.agent.tpm_backend import TpmSpec

HOST = "127.0.0.1"


def missing() -> str:
    """Why swtpm-backed tests cannot run here, or "" when they can."""
    for tool in ("swtpm", "swtpm_ioctl", "swtpm_setup", "swtpm_localca"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install swtpm swtpm-tools)"
    from vcomp.agent.tss_tpm import TSS_IMPORT_ERROR

    if TSS_IMPORT_ERROR:
        return f"tpm2-pytss not importable: {TSS_IMPORT_ERROR} (pip install 'vcomp[tpm]')"
    return ""


def require() -> None:
    reason = missing()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)


def _free_port_pair() -> int:
    """A port P with P+1 also free: the TSS's swtpm TCTI reaches the control port at P+1."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind((HOST, 0))
            port = int(a.getsockname()[1])
            try:
                b.bind((HOST, port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free loopback ports")


@dataclass
class Swtpm:
    """One swtpm process; its TPM state lives in ``state_dir`` and survives :meth:`stop`."""

    state_dir: Path
    port: int = 0
    ctrl_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def spec(self) -> TpmSpec:
        return TpmSpec("swtpm", host=HOST, port=self.port)

    @property
    def ca_dir(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}-ca"

    @property
    def ca_root_pem(self) -> Path:
        """The manufacturer root CA that ``provision_ek`` made (swtpm_localca's)."""
        return self.ca_dir / "swtpm-localca-rootca-cert.pem"

    def provision_ek(self) -> None:
        """Manufacture the TPM before first start: RSA and ECC EKs, their certificates
        in NV (RSA 0x1c00002, ECC P-384 0x1c00016) issued by a local CA (swtpm_localca) under
        ``ca_dir``."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        setup, localca, options = (self.ca_dir / n for n in ("setup.conf", "ca.conf", "ca.opts"))
        setup.write_text(
            f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
            f"create_certs_tool_config = {localca}\n"
            f"create_certs_tool_options = {options}\n"
        )
        localca.write_text(
            f"statedir = {self.ca_dir}\n"
            f"signingkey = {self.ca_dir / 'signkey.pem'}\n"
            f"issuercert = {self.ca_dir / 'issuercert.pem'}\n"
            f"certserial = {self.ca_dir / 'certserial'}\n"
        )
        options.write_text("--platform-manufacturer vcomp-test\n--platform-model swtpm\n")
        args = ["swtpm_setup", "--tpm2", "--tpmstate", str(self.state_dir), "--create-ek-cert"]
        subprocess.run(
            [*args, "--config", str(setup), "--overwrite"], check=True, capture_output=True
        )

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:  # keep the ports across stop/start: the agent's spec names them
            self.port = _free_port_pair()
        self.ctrl_port = self.port + 1
        log = (self.state_dir.parent / f"{self.state_dir.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={self.port},bindaddr={HOST}",
                "--ctrl",
                f"type=tcp,port={self.ctrl_port},bindaddr={HOST}",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        for _ in range(500):  # wait until it listens (not a timing assertion)
            if self.proc.poll() is not None:
                raise RuntimeError(f"swtpm exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.ctrl_port)):
                return
            time.sleep(0.01)
        raise RuntimeError("swtpm did not start listening")

    def ioctl(self, *args: str) -> None:
        subprocess.run(
            ["swtpm_ioctl", "--tcp", f"{HOST}:{self.ctrl_port}", *args],
            check=True,
            capture_output=True,
        )

    def reset(self) -> None:
        """A TPM reset (power cycle): CMD_INIT, then TPM2_Startup(CLEAR) as firmware would."""
        from tpm2_pytss import ESAPI, TCTILdr
        from tpm2_pytss.constants import TPM2_SU

        self.ioctl("-i")
        esys = ESAPI(TCTILdr(*self.spec.tcti()))
        try:
            esys.startup(TPM2_SU.CLEAR)
        finally:
            esys.close()

    def read_nv(self, index: int) -> bytes:
        """An NV index's whole contents (e.g. an EK certificate), read through the TSS."""
        from tpm2_pytss import ESAPI, TCTILdr

        esys = ESAPI(TCTILdr(*self.spec.tcti()))
        try:
            handle = esys.tr_from_tpmpublic(index)
            nv_public, _ = esys.nv_read_public(handle)
            size = int(nv_public.nvPublic.dataSize)
            out = b""
            while len(out) < size:
                chunk = min(512, size - len(out))
                out += bytes(esys.nv_read(handle, chunk, len(out), auth_handle=handle))
            return out
        finally:
            esys.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self.ioctl("-s")  # orderly: swtpm saves its state and exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def running_swtpm(state_dir: Path, *, ek: bool = False) -> Iterator[Swtpm]:
    """A started swtpm; ``ek``: manufactured first, with EK certificates from a local CA."""
    tpm = Swtpm(state_dir)
    if ek:
        tpm.provision_ek()
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()
