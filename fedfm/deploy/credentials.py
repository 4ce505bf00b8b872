"""TLS and SuperNode-authentication files for a Flower 1.42 deployment.

:func:`make_tls` writes, into one folder (usually on the SuperLink host):

* ``ca.crt`` — self-signed CA certificate (PEM). ``flower-superlink
  --ssl-ca-certfile ca.crt``; every client trusts it: ``flower-supernode
  --root-certificates ca.crt`` and, for the ``flwr`` CLI, ``root-certificates =
  "/abs/path/ca.crt"`` under ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``.
* ``ca.key`` — the CA's private key (0600); only for signing more certificates,
  keep it off the servers.
* ``server.pem`` — server certificate signed by the CA, whose SubjectAltName
  lists every host clients dial (IPs as IPAddress, names as DNSName).
  ``flower-superlink --ssl-certfile server.pem``.
* ``server.key`` — its private key (0600). ``flower-superlink --ssl-keyfile``.

:func:`make_node_key` writes one pair per SuperNode (both EC P-384, OpenSSH
encoding, which is what Flower parses — a PKCS8/SPKI PEM key is rejected):

* ``<name>.key`` — private key (0600, ``-----BEGIN OPENSSH PRIVATE KEY-----``).
  ``flower-supernode --auth-supernode-private-key <name>.key``.
* ``<name>.pub`` — public key (``ecdsa-sha2-nistp384 AAAA... <name>``).
  ``flwr supernode register <name>.pub [SUPERLINK]``, run before the node
  starts, against a SuperLink started with ``--enable-supernode-auth``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfm.errors import FedfmError

__all__ = ["make_node_key", "make_tls"]


def _check_free(paths: Sequence[Path], overwrite: bool) -> None:
    """Raise FedfmError if a target exists and overwriting was not asked for."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FedfmError(f"refusing to overwrite {', '.join(existing)} (pass overwrite=True)")


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    """Write ``data`` to ``path``; a secret is never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # the mode given to os.open is ignored for an existing file
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM, what the SuperLink's TLS server loads."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """IP literals become IPAddress entries, everything else DNSName."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          signer: ec.EllipticCurvePrivateKey, days: int,
          extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    """Build and sign one certificate valid from five minutes ago for ``days`` days."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def make_tls(folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
             days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """Create a CA and a CA-signed server certificate valid for every name in ``hosts``.

    Writes ca.crt, ca.key, server.pem and server.key into ``folder`` and returns
    ``{"ca": .../ca.crt, "cert": .../server.pem, "key": .../server.key}``.
    Raises FedfmError if ``hosts`` is empty, ``days`` < 1, or a file already
    exists and ``overwrite`` is false.
    """
    hosts = [hosts] if isinstance(hosts, str) else list(hosts)
    if not hosts or days < 1:
        raise FedfmError("make_tls needs at least one host and days >= 1")
    paths = {n: Path(folder) / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")}
    _check_free(list(paths.values()), overwrite)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    srv_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfm CA")])
    ca = _cert("fedfm CA", ca_key, ca_name, ca_key, days, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False,
                       key_encipherment=False, data_encipherment=False,
                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    ])
    server = _cert(hosts[0], srv_key, ca_name, ca_key, days, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_san(hosts), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ])
    _write(paths["ca.crt"], ca.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca.key"], _pem_key(ca_key), secret=True)
    _write(paths["server.pem"], server.public_bytes(serialization.Encoding.PEM))
    _write(paths["server.key"], _pem_key(srv_key), secret=True)
    return {"ca": paths["ca.crt"], "cert": paths["server.pem"], "key": paths["server.key"]}


def make_node_key(folder: Path, name: str, overwrite: bool = False) -> dict[str, Path]:
    """Create the SuperNode authentication key pair ``<name>.key`` / ``<name>.pub``.

    Returns ``{"private": .../<name>.key, "public": .../<name>.pub}``. Raises
    FedfmError for a name that is not a plain file stem, or if a file already
    exists and ``overwrite`` is false.
    """
    if not name or name != Path(name).name or name.startswith("."):
        raise FedfmError(f"invalid node key name {name!r}: use a plain file stem")
    private, public = Path(folder) / f"{name}.key", Path(folder) / f"{name}.pub"
    _check_free([private, public], overwrite)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ), secret=True)
    _write(public, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH,
    ) + f" {name}\n".encode())
    return {"private": private, "public": public}
