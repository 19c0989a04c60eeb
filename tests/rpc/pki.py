"""A throwaway certificate authority for mutual-TLS tests (openssl, installed by ./dev)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SAN = "subjectAltName=IP:127.0.0.1,DNS:localhost"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pki:
    root: Path
    ca_name: str = "ca"

    @property
    def ca(self) -> Path:
        return self.root / f"{self.ca_name}.pem"

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def args(self, name: str) -> list[str]:
        """The `megaflow` options that present `name`'s certificate."""
        return ["--tls-cert", str(self.cert(name)), "--tls-key", str(self.key(name)),
                "--tls-ca", str(self.ca)]  # fmt: skip


def make_pki(root: Path, names: tuple[str, ...] = ("server", "client"), ca: str = "ca") -> Pki:
    """A CA (`ca.pem`) and, for each name, a key and a certificate it signed, valid for
    127.0.0.1 and localhost (keys mode 600)."""
    root.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
             "-subj", f"/CN=megaflow-test-{ca}", cwd=root)  # fmt: skip
    (root / "san.ext").write_text(SAN + "\n")
    for name in names:
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                 cwd=root)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", "san.ext", cwd=root)  # fmt: skip
        (root / f"{name}.key").chmod(0o600)
    return Pki(root, ca)
