"""WireGuard key handling: X25519 keys in WireGuard's base64 form (same as ``wg genkey``)."""

from __future__ import annotations

import base64
import binascii
import hashlib


def generate_keypair() -> tuple[str, str]:
    """Return ``(private_key, public_key)`` as base64 strings, like ``wg genkey | wg pubkey``."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    private = X25519PrivateKey.generate()
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw_private).decode(), base64.b64encode(raw_public).decode()


def public_key_of(private_key: str) -> str:
    """Derive the base64 public key of a base64 private key (``wg pubkey``)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = X25519PrivateKey.from_private_bytes(decode_key(private_key))
    return base64.b64encode(
        private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ).decode()


def decode_key(key: str) -> bytes:
    """Decode a base64 WireGuard key to its 32 raw bytes, or raise ``ValueError``."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("key is not valid base64") from exc
    if len(raw) != 32:
        raise ValueError("key must be 32 bytes (44 base64 characters)")
    return raw


def validate_public_key(key: str) -> str:
    """Return ``key`` if it is a well-formed WireGuard public key, else raise ``ValueError``."""
    raw = decode_key(key)
    if raw == bytes(32):
        raise ValueError("the all-zero key is not a valid public key")
    return key


def key_to_hex(key: str) -> str:
    """Base64 key to the lowercase hex form that WireGuard's UAPI protocol uses."""
    return decode_key(key).hex()


def hex_to_key(hex_key: str) -> str:
    """Hex key (UAPI form) to WireGuard's base64 form."""
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


def ca_hash(ca_pem: bytes | str) -> str:
    """``sha256:<hex>`` of a CA certificate's SubjectPublicKeyInfo (kubeadm's CA hash)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
    cert = x509.load_pem_x509_certificate(data)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()
