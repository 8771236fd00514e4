"""The ``fedlora-certs`` command: development certificates and SuperNode keys for a deployment.

    fedlora-certs DIR [--nodes N] [--name HOST ...] [--days D]

writes into ``DIR``:

- ``ca.crt`` / ``ca.key``: a self-signed development CA (EC P-384). ``ca.crt`` goes to every
  machine that connects to the SuperLink (SuperNodes: ``--root-certificates``; ``flwr``:
  ``root-certificates`` in ``$FLWR_HOME/config.toml``). ``ca.key`` never leaves this machine.
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  ``127.0.0.1``, ``::1``, ``localhost`` and every ``--name`` (host names or IP addresses under
  which the nodes reach the SuperLink).
- ``node-<i>.key`` / ``node-<i>.pub`` for ``i = 1..N``: each SuperNode's authentication key pair
  (EC P-384, OpenSSH format, what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read). The private key stays on its node.

Existing files are never overwritten, so running it again with a larger ``--nodes`` adds keys
for new nodes under the same CA. Private keys are written with mode 0600.

Uses ``cryptography`` (a dependency of flwr); no ``openssl`` binary needed. For production, use
certificates from your organisation's CA instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _builder(subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a TLS server with an EC key signs handshakes and agrees on keys."""
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def make_ca(directory: Path, days: int) -> None:
    """Write ``ca.key`` and a self-signed ``ca.crt``."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora development CA")])
    cert = (_builder("fedlora development CA", name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .sign(key, hashes.SHA384()))
    _write_private(directory / "ca.key", _pem_key(key))
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_server(directory: Path, names: list[str], days: int) -> None:
    """Write ``server.key`` and ``server.crt`` (signed by the CA in ``directory``) for ``names``."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(names[0], ca_cert.subject, key.public_key(), days)
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA384()))  # type: ignore[arg-type]
    _write_private(directory / "server.key", _pem_key(key))
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(directory: Path, name: str) -> None:
    """Write ``<name>.key`` (OpenSSH private key) and ``<name>.pub`` (OpenSSH public key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(directory / f"{name}.key", private)
    (directory / f"{name}.pub").write_bytes(public + f" {name}\n".encode())


def server_names(directory: Path) -> list[str]:
    """The host names and addresses in ``server.crt``'s subject alternative names."""
    cert = x509.load_pem_x509_certificate((directory / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def create(directory: Path, nodes: int, names: list[str], days: int) -> list[str]:
    """Create what is missing in ``directory``; return the names of the files written.

    Raises ``ValueError`` when an existing ``server.crt`` lacks a requested name (it is never
    replaced silently: the SuperLink would still present the old one).
    """
    directory.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys([*LOOPBACK_NAMES, *names]))
    written = []
    if not (directory / "ca.crt").exists():
        if (directory / "server.crt").exists():
            raise ValueError(f"{directory} has server.crt but no ca.crt: move both out and run again")
        make_ca(directory, days)
        written += ["ca.crt", "ca.key"]
    if not (directory / "server.crt").exists():
        make_server(directory, wanted, days)
        written += ["server.crt", "server.key"]
    else:
        present = {_normal(x) for x in server_names(directory)}
        missing = [n for n in wanted if _normal(n) not in present]
        if missing:
            raise ValueError(f"{directory / 'server.crt'} is not valid for {missing}: delete server.crt and "
                             "server.key and run again with every --name (then restart the SuperLink)")
    for i in range(1, nodes + 1):
        if not (directory / f"node-{i}.key").exists():
            make_node_key(directory, f"node-{i}")
            written += [f"node-{i}.key", f"node-{i}.pub"]
    return written


def _normal(name: str) -> str:
    """One spelling per name: IP addresses in canonical form, host names in lower case."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


def main(argv: list[str] | None = None) -> int:
    """The console script ``fedlora-certs``."""
    parser = argparse.ArgumentParser(prog="fedlora-certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where to write (created if needed)")
    parser.add_argument("--nodes", type=int, default=0,
                        help="make key pairs node-1..node-N (existing ones are kept)")
    parser.add_argument("--name", action="append", default=[],
                        help="another host name or IP address of the SuperLink (repeatable)")
    parser.add_argument("--days", type=int, default=365, help="validity of new certificates (default 365)")
    args = parser.parse_args(argv)
    if args.nodes < 0 or args.days < 1:
        parser.error(f"--nodes={args.nodes} --days={args.days}: use --nodes >= 0 and --days >= 1")
    try:
        written = create(args.directory, args.nodes, args.name, args.days)
    except ValueError as exc:
        print(f"fedlora-certs: {exc}", file=sys.stderr)
        return 2
    what = ", ".join(written) if written else "nothing (all present)"
    print(f"fedlora-certs: wrote {what} in {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
