from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vcomp.agent import measure
from vcomp.agent.tpm import SimulatedTpm, TpmError
from vcomp.errors import ConfigError
from vcomp.protocol import tpm_format as tf

POLICY = {"memory_mb": 256, "network": False, "cpu_seconds": 60}


def make_tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "sub" / "a.py").write_text("y = 2\n")
    (root / "pkg" / "b.py").write_text("z = 3\n")
    (root / "pkg" / "notes.txt").write_text("not code\n")
    (root / "pkg" / "sub" / "a.cpython-311.pyc").write_bytes(b"\x00")


def test_code_digest_by_hand(tmp_path: Path) -> None:
    make_tree(tmp_path)
    root = tmp_path / "pkg"
    h = hashlib.sha256()
    for rel in ("__init__.py", "b.py", "sub/a.py"):  # sorted by POSIX path
        content = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + hashlib.sha256(content).digest())
    assert measure.code_digest(root) == h.digest()


def test_code_digest_sees_edits_and_renames(tmp_path: Path) -> None:
    make_tree(tmp_path)
    root = tmp_path / "pkg"
    before = measure.code_digest(root)
    (root / "notes.txt").write_text("changed, but not code\n")
    assert measure.code_digest(root) == before
    (root / "b.py").write_text("z = 4\n")
    edited = measure.code_digest(root)
    assert edited != before
    (root / "b.py").rename(root / "c.py")
    assert measure.code_digest(root) != edited


def test_installed_package_digest_is_stable() -> None:
    assert measure.code_digest() == measure.code_digest(measure.package_dir())
    assert (measure.package_dir() / "agent" / "measure.py").is_file()


def test_policy_digest_is_canonical() -> None:
    reordered = dict(reversed(list(POLICY.items())))
    assert measure.policy_digest(POLICY) == measure.policy_digest(reordered)
    expected = b'{"cpu_seconds":60,"memory_mb":256,"network":false}'
    assert measure.canonical_policy(POLICY) == expected
    assert measure.policy_digest(POLICY) == hashlib.sha256(expected).digest()
    assert measure.policy_digest({**POLICY, "memory_mb": 257}) != measure.policy_digest(POLICY)


def test_policy_must_be_plain_json() -> None:
    with pytest.raises(ConfigError):
        measure.policy_digest({"path": Path("/")})
    with pytest.raises(ConfigError):
        measure.policy_digest({"x": float("nan")})


def test_measured_launch_yields_the_golden_measurement(tmp_path: Path) -> None:
    tpm = SimulatedTpm.open(tmp_path / "tpm")
    got = measure.measured_launch(tpm, POLICY)
    golden = measure.golden_measurement(POLICY)
    assert got == golden
    assert golden.pcrs == (
        (17, tf.extend(bytes(32), measure.code_digest())),
        (18, tf.extend(bytes(32), measure.policy_digest(POLICY))),
    )
    assert golden.format().startswith("sha256:17=")
    assert measure.golden_measurement({"other": 1}) != golden
    with pytest.raises(TpmError, match="already"):
        measure.measured_launch(tpm, POLICY)


def test_the_spec_shows_this_release_default_policy() -> None:
    """attestation.md 3 prints the canonical JSON that PCR 18 measures by default; an
    implementer checks their canonical JSON against it, so it must not drift."""
    from vcomp.agent.config import POLICY_VERSION, SandboxPolicy

    spec = Path(__file__).resolve().parents[2] / "protocol" / "spec" / "attestation.md"
    shown = [ln for ln in spec.read_text().splitlines() if ln.startswith('{"policy_version":')]
    policy = {"policy_version": POLICY_VERSION, "sandbox": SandboxPolicy().as_dict()}
    assert shown == [measure.canonical_policy(policy).decode()]
