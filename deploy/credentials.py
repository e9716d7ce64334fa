"""Make every secret a deployment needs: a private CA, TLS certificates, SuperNode auth keys.

    python deploy/credentials.py --nodes 3                 # -> deploy/credentials/
    python deploy/credentials.py --nodes 3 --san link.example.org --san 203.0.113.7

Layout (one folder per service, so each container mounts only its own secrets)::

    credentials/
      ca/ca.key                       the CA's private key: mounted nowhere, keep it offline
      superlink/{ca.crt,server.crt,server.key}
      supernode-I/{ca.crt,runtime.crt,runtime.key,auth.key,auth.pub}
      superexec/{ca.crt}              what every SuperExec and the flwr CLI need to trust
      public-keys/supernode-I.pub     what the operator registers with `flwr supernode register`

Why these shapes (checked against flwr 1.41's source):
* SuperLink serves Fleet, Control and Runtime APIs on one HTTPS port, and its SuperExec/CLI may
  dial it as ``superlink``, ``localhost`` or an IP: the server certificate carries all of them.
* A SuperNode's Runtime API (which its ClientApp SuperExec dials) is HTTPS too, under the node's
  own name, hence one runtime certificate per node.
* Node-auth keys must be EC keys on a NIST curve in OpenSSH format (Flower loads them with
  ``load_ssh_private_key``; a PEM key is rejected), so they are written as OpenSSH, P-384.

Re-running keeps an existing CA and keys (so registered nodes stay registered) and only adds
what is missing; ``--force`` starts over.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_OUT = Path(__file__).resolve().parent / "credentials"
VALID_DAYS = 825  # the longest validity common TLS clients accept for a leaf certificate
LINK_NAMES = ("superlink", "localhost", "127.0.0.1", "::1")


def supernode_name(index: int) -> str:
    """Service, host and folder name of the index-th SuperNode (1-based, as in compose)."""
    return f"supernode-{index}"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    # Containers run as a non-root user (uid 49999 in Flower's images): keys must stay readable
    # there when mounted, so they are 0644 inside a 0700 folder tree rather than 0600.
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_or_make_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, _pem_key(key))
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrep deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _load_or_make_key(folder / "ca" / "ca.key")
    cert_path = folder / "ca" / "ca.crt"
    if cert_path.is_file():
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedrep deployment CA"))
        .issuer_name(_name("fedrep deployment CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def issue_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      names: list[str], cert_path: Path, key_path: Path) -> None:
    """A TLS server certificate for ``names`` (DNS names or IPs), signed by the CA."""
    key = _load_or_make_key(key_path)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_alt_names(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def make_auth_keys(private_path: Path, public_path: Path) -> bytes:
    """An OpenSSH-format P-384 key pair for SuperNode authentication; the public key's bytes."""
    if private_path.is_file():
        key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(private_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(public_path, public + b"\n")
    return public


def make_credentials(out: Path, num_nodes: int, extra_link_names: Iterable[str] = (),
                     node_names: dict[int, list[str]] | None = None) -> Path:
    """Create (or complete) the credentials folder for a SuperLink and ``num_nodes`` SuperNodes.

    ``extra_link_names``: further names/IPs the SuperLink is reached by (a public DNS name, the
    host's IP). ``node_names``: further names per node index for its runtime certificate."""
    if num_nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {num_nodes}")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca_key, ca_cert = make_ca(out)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    link = out / "superlink"
    issue_server_cert(ca_key, ca_cert, [*LINK_NAMES, *extra_link_names],
                      link / "server.crt", link / "server.key")
    _write(link / "ca.crt", ca_pem)
    _write(out / "superexec" / "ca.crt", ca_pem)
    for index in range(1, num_nodes + 1):
        name = supernode_name(index)
        node = out / name
        names = [name, "localhost", "127.0.0.1", *(node_names or {}).get(index, [])]
        issue_server_cert(ca_key, ca_cert, names, node / "runtime.crt", node / "runtime.key")
        _write(node / "ca.crt", ca_pem)
        make_auth_keys(node / "auth.key", node / "auth.pub")
        _write(out / "public-keys" / f"{name}.pub", (node / "auth.pub").read_bytes())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})")
    parser.add_argument("--san", action="append", default=[],
                        help="another DNS name or IP the SuperLink is reached by (repeatable)")
    parser.add_argument("--force", action="store_true", help="delete the folder's CA and keys first")
    args = parser.parse_args(argv)
    if args.force and args.out.exists():
        import shutil

        shutil.rmtree(args.out)
    try:
        out = make_credentials(args.out, args.nodes, args.san)
    except ValueError as err:
        parser.error(str(err))
    print(f"credentials for 1 SuperLink and {args.nodes} SuperNodes in {out}")
    print(f"register the nodes once the SuperLink runs: python deploy/register_supernodes.py "
          f"--keys {out / 'public-keys'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
