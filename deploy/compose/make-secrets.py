"""Writes what docker compose needs to run loraforge with API keys (and, with --tls, TLS).

    python deploy/compose/make-secrets.py [--tls] [--force] [--dir deploy/compose]

`.env` (mode 0600) gets the bootstrap admin key, the trainer's, the worker's and the
predictor's own keys (`lf_<12 hex>_<43 characters>`), and random store credentials.
An existing `.env` is kept unless --force. With --tls, `tls/` gets a CA (`ca.crt`) and
one server certificate for every service name (`tls.crt`, `tls.key`): this needs the
`cryptography` package (installed with loraforge).

Use the admin key from the host: `LORAFORGE_API_KEY=<LORAFORGE_ADMIN_KEY from .env>`.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = (
    "LORAFORGE_ADMIN_KEY",
    "LORAFORGE_TRAINER_KEY",
    "LORAFORGE_WORKER_KEY",
    "LORAFORGE_PREDICTOR_KEY",
)
NAMES = ("dataset", "trainer", "predictor", "openai", "console", "localhost")


def api_key() -> str:
    """A key in loraforge's format: `lf_` + 12 hex digits + `_` + 43 urlsafe characters."""
    return f"lf_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def env_text() -> str:
    lines = ["# Made by deploy/compose/make-secrets.py; keep it private (mode 0600)."]
    lines += [f"{name}={api_key()}" for name in KEYS]
    lines.append(f"LORAFORGE_S3_SECRET_KEY={secrets.token_urlsafe(24)}")
    lines.append(f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}")
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str | bytes, mode: int = 0o600) -> None:
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def make_tls(folder: Path, days: int = 825) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loraforge compose CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in NAMES]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loraforge")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "tls.crt").write_bytes(cert.public_bytes(pem))
    write_private(
        folder / "tls.key",
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=HERE, help="where .env and tls/ go")
    parser.add_argument("--tls", action="store_true", help="also make tls/ca.crt, tls.crt, tls.key")
    parser.add_argument("--force", action="store_true", help="replace an existing .env")
    args = parser.parse_args(argv)
    env = args.dir / ".env"
    if env.exists() and not args.force:
        print(f"{env} exists; kept (--force makes new keys)")
    else:
        write_private(env, env_text())
        print(f"wrote {env} (mode 0600)")
    if args.tls:
        make_tls(args.dir / "tls")
        print(
            f"wrote {args.dir / 'tls'}: ca.crt, tls.crt, tls.key (mode 0600; the containers run "
            f"as uid 10001: `sudo chown 10001 {args.dir / 'tls' / 'tls.key'}`)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
