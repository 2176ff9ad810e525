"""The scheduler's self-signed TLS certificate.

The agent pins the exact PEM it is given in ``program.json`` (``callback.cert``),
so the certificate only has to be stable and private: it is created once per
directory and reused afterwards.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import socket
from pathlib import Path
from typing import Iterable, Tuple

CERT_NAME = "callback-cert.pem"
KEY_NAME = "callback-key.pem"
VALIDITY_DAYS = 3650


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a fresh temporary file created with ``mode``, then
    rename it into place, so ``path`` never exists half-written or with a
    wider mode."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widen past mode
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _names(hostnames: Iterable[str]) -> list:
    names = ["localhost"]
    try:
        names.append(socket.gethostname())
    except OSError:  # pragma: no cover
        pass
    names.extend(hostnames)
    seen = []
    for n in names:
        if n and n not in seen:
            seen.append(n)
    return seen


def _generate(cert_path: Path, key_path: Path, hostnames: Iterable[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names = _names(hostnames)
    alt = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chaperone scheduler")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=True,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a certificate without its key is never left behind as "existing".
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o600)  # (public, but nothing under CHAPERONE_HOME is for others)


def ensure_certificate(directory: Path, hostnames: Iterable[str] = ()) -> Tuple[Path, Path]:
    """Return ``(cert_path, key_path)`` in ``directory``, creating a
    self-signed P-256 certificate and key on first use (key mode 0600)."""
    directory = Path(directory)
    old_umask = os.umask(0o077)  # missing parents are private too, not only the leaf
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    finally:
        os.umask(old_umask)
    cert_path = directory / CERT_NAME
    key_path = directory / KEY_NAME
    if cert_path.is_file() and key_path.is_file():
        for path in (cert_path, key_path):  # (an earlier version wrote the certificate 0644)
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)
        return cert_path, key_path
    # Two processes starting at once must not each write half a pair.
    lock_fd = os.open(directory / ".cert.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if not (cert_path.is_file() and key_path.is_file()):
            _generate(cert_path, key_path, tuple(hostnames))
    finally:
        os.close(lock_fd)
    return cert_path, key_path


def cert_pem(cert_path: Path) -> str:
    """The certificate as PEM text (what goes into ``callback.cert``)."""
    return Path(cert_path).read_text(encoding="ascii")
