"""Throwaway credentials for one testbed run: bearer tokens per tenant, a CA and a TLS server certificate.

Everything is generated at the start of a run into the run's own directory and is worth nothing after
it: a fresh EC P-256 CA (valid ``days``), a server certificate it signs for the names and addresses the
UEs dial (``localhost``, ``127.0.0.1`` and whatever the caller adds, e.g. ``edge`` in Docker or the
testbed's namespace addresses), and one random token per tenant. The server's token file
(``coinfer-edge serve --auth-tokens``) holds only each token's sha256; the tokens themselves are in
``tokens/<tenant>.token`` (mode 0600) for the UEs. Keys are written mode 0600.

``python -m testbed.credentials --out DIR (--tenants a,b | --count N [--prefix ue-]) [--hosts edge]`` does
the same from a shell (the Docker testbed's init service; each UE container claims one ``ue-<i>.token``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CredentialsError(ValueError):
    """Bad input for the credentials (a tenant name that cannot be a file name, no tenants, bad days)."""


@dataclasses.dataclass
class Credentials:
    """Where one run's credentials are, and the arguments that use them. ``add_tenants`` issues more
    tokens later (rewrite the server's file, then SIGHUP the server: it re-reads the file)."""

    directory: Path
    tokens_file: Path
    """``--auth-tokens`` of the server: ``{"tenants": {name: {"token_sha256": hex}}}``."""
    ca_cert: Path
    """PEM of the CA: the clients' ``tls_ca``."""
    server_cert: Path
    server_key: Path
    tokens: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    """Tenant -> bearer token."""

    def server_args(self) -> list[str]:
        """The ``coinfer-edge serve`` options for authentication and TLS."""
        return ["--auth-tokens", str(self.tokens_file), "--tls-cert", str(self.server_cert),
                "--tls-key", str(self.server_key)]

    def token_file(self, tenant: str) -> Path:
        return self.directory / "tokens" / f"{tenant}.token"

    def client_options(self, tenant: str) -> dict[str, str]:
        """``CoinferClient``/``ClientOptions`` keywords for ``tenant``: its token, TLS with our CA."""
        if tenant not in self.tokens:
            raise CredentialsError(f"no token for tenant {tenant!r} in {self.tokens_file}")
        return {"tenant": tenant, "token": self.tokens[tenant], "tls_ca": str(self.ca_cert)}

    def add_tenants(self, tenants: Sequence[str]) -> dict[str, str]:
        """Issue a token for each new tenant (an existing one keeps its token); rewrite the server's file
        (atomically) and the token files. Returns tenant -> token for ``tenants``."""
        _check_tenants(tenants)
        new = {t: secrets.token_urlsafe(32) for t in tenants if t not in self.tokens}
        for t, tok in new.items():
            _write_private(self.token_file(t), tok.encode())
        self.tokens.update(new)
        table = {t: {"token_sha256": hashlib.sha256(tok.encode()).hexdigest()} for t, tok in self.tokens.items()}
        tmp = self.tokens_file.with_name(self.tokens_file.name + ".tmp")
        _write_private(tmp, json.dumps({"tenants": table}, indent=1).encode())
        os.replace(tmp, self.tokens_file)
        return {t: self.tokens[t] for t in tenants}

    def to_dict(self) -> dict[str, object]:
        """Paths only (no token), for logs and result files."""
        return {"tokens_file": str(self.tokens_file), "ca_cert": str(self.ca_cert),
                "server_cert": str(self.server_cert), "tenants": sorted(self.tokens)}


def _check_tenants(tenants: Sequence[str]) -> None:
    bad = [t for t in tenants if not isinstance(t, str) or not _TENANT_RE.match(t)]
    if bad:
        raise CredentialsError(f"tenant names must match {_TENANT_RE.pattern}: {bad[:3]}")
    if len(set(tenants)) != len(tenants):
        raise CredentialsError("duplicate tenant names")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _names(hosts: Iterable[str]):
    from cryptography import x509

    out, seen = [], set()
    for h in hosts:
        if not h or h in seen:
            continue
        seen.add(h)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def make_credentials(directory: Path, tenants: Sequence[str], *, hosts: Iterable[str] = (),
                     days: int = 2) -> Credentials:
    """Generate a CA, a server certificate for ``DEFAULT_HOSTS`` + ``hosts`` and a token per tenant.

    Raises CredentialsError for no tenants, a duplicate or a name outside ``[A-Za-z0-9._-]`` (it names
    a file), or ``days`` < 1.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    tenants = list(tenants)
    if not tenants:
        raise CredentialsError("at least one tenant is needed")
    _check_tenants(tenants)
    if days < 1:
        raise CredentialsError(f"days must be >= 1, got {days}")
    directory = Path(directory)
    if (directory / "tokens").is_dir():  # a previous run's tokens (and the Docker UEs' claims) go
        shutil.rmtree(directory / "tokens")
    (directory / "tokens").mkdir(parents=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"coinfer testbed CA {secrets.token_hex(4)}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = _names([*DEFAULT_HOSTS, *hosts])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coinfer-edge")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    _write_private(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    creds = Credentials(directory, directory / "tokens.json", ca_path, cert_path, key_path)
    creds.add_tenants(tenants)
    log.info("credentials for %d tenants, certificate for %d names, in %s", len(tenants), len(san), directory)
    return creds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.credentials", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for ca.pem, server.pem/.key, tokens")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenants", help="comma-separated tenant names (one token each)")
    who.add_argument("--count", type=int, help="this many tenants, named PREFIX1..PREFIXN (e.g. one per Docker UE)")
    p.add_argument("--prefix", default="ue-", help="tenant name prefix with --count (default ue-)")
    p.add_argument("--hosts", default="", help="extra DNS names / IPs for the server certificate (comma list)")
    p.add_argument("--days", type=int, default=2)
    args = p.parse_args(argv)
    try:
        if args.count is not None:
            tenants = [f"{args.prefix}{i}" for i in range(1, args.count + 1)]
        else:
            tenants = [t for t in args.tenants.split(",") if t]
        creds = make_credentials(args.out, tenants,
                                 hosts=[h for h in args.hosts.split(",") if h], days=args.days)
    except CredentialsError as e:
        print(f"credentials: {e}", file=sys.stderr)
        return 2
    print(json.dumps(creds.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
