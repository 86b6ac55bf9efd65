"""WireGuard key handling: X25519 keys in WireGuard's base64 form (same as ``wg genkey``)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass


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


# --- proof of possession: an X25519 challenge ------------------------------------------

PROOF_LABEL = b"cladnet host proof v1"


@dataclass(frozen=True)
class Challenge:
    """What the controller sends (``ephemeral_public``, ``nonce``) and what it keeps:
    ``proof_digest``, the SHA-256 of the expected answer (never the answer itself, nor
    the ephemeral private key, so whoever reads the stored challenge cannot answer it)."""

    ephemeral_public: str
    nonce: str
    proof_digest: str


def _proof_message(
    ephemeral_public: str, nonce: str, host_id: str, network_id: str, public_key: str
) -> bytes:
    # Every field is bound, length-prefixed, so no two field sets share a message.
    parts = [PROOF_LABEL, *(p.encode() for p in (ephemeral_public, nonce, host_id, network_id))]
    parts.append(decode_key(public_key))
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def _mac(shared: bytes, message: bytes) -> str:
    # The raw X25519 output keys an HMAC only after an extract step with our own label
    # (as HKDF does), so the MAC key is never the bare value WireGuard's handshake uses.
    key = hmac.new(PROOF_LABEL, shared, hashlib.sha256).digest()
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def make_challenge(public_key: str, host_id: str, network_id: str) -> Challenge:
    """A challenge for the holder of ``public_key``'s private key to answer.

    Raises ``ValueError`` for a low-order point (its shared secret is all zeros, which
    anyone could compute): such a key can prove nothing.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(decode_key(public_key)))
    ephemeral_public = base64.b64encode(
        ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ).decode()
    nonce = base64.b64encode(os.urandom(32)).decode()
    expected = _mac(
        shared, _proof_message(ephemeral_public, nonce, host_id, network_id, public_key)
    )
    return Challenge(ephemeral_public, nonce, _digest(expected))


def answer_challenge(
    private_key: str, ephemeral_public: str, nonce: str, host_id: str, network_id: str
) -> str:
    """The proof (base64 HMAC-SHA256) that the holder of ``private_key`` sends back."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    private = X25519PrivateKey.from_private_bytes(decode_key(private_key))
    shared = private.exchange(X25519PublicKey.from_public_bytes(decode_key(ephemeral_public)))
    message = _proof_message(
        ephemeral_public, nonce, host_id, network_id, public_key_of(private_key)
    )
    return _mac(shared, message)


def check_proof(proof: str, proof_digest: str) -> bool:
    """Whether ``proof`` is the answer whose digest the controller kept (constant time)."""
    return hmac.compare_digest(_digest(proof), proof_digest)


def _digest(proof: str) -> str:
    return hashlib.sha256(proof.encode()).hexdigest()
