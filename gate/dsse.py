"""DSSE (Dead Simple Signing Envelope) v1 with ed25519 keys, as ``gate run --sign-key`` and ``gate verify`` use it.

An envelope is ``{"payload": base64(body), "payloadType": type, "signatures": [{"keyid", "sig"}]}``; each
signature is over the pre-authentication encoding :func:`pae` of the type and the body, never over the body
alone, so a signature cannot be replayed on another payload type. Keys are PEM files (PKCS#8 private keys,
SubjectPublicKeyInfo public keys) read by ``cryptography``; the keyid is the sha256 of the public key's DER
SubjectPublicKeyInfo (``openssl pkey -pubin -in key.pub.pem -outform DER | sha256sum``). The keyid is only
a hint: verification tries every signature against the key it is given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gate.errors import GateError, UsageError

PASSWORD_ENV = "GATE_SIGN_KEY_PASSWORD"  # the passphrase of an encrypted private key, if any


def pae(payload_type: str, body: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body, where LEN
    is the byte length in ASCII decimal.

    >>> pae("http://example.com/HelloWorld", b"hello world")
    b'DSSEv1 29 http://example.com/HelloWorld 11 hello world'
    """
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def keyid(public_key: Ed25519PublicKey) -> str:
    """sha256 (hex) of the public key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def sign(body: bytes, payload_type: str, key: Ed25519PrivateKey) -> dict:
    """A DSSE JSON envelope of ``body`` with one ed25519 signature (standard base64)."""
    sig = key.sign(pae(payload_type, body))
    return {"payload": base64.b64encode(body).decode("ascii"), "payloadType": payload_type,
            "signatures": [{"keyid": keyid(key.public_key()), "sig": base64.b64encode(sig).decode("ascii")}]}


def b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not (DSSE verifiers must accept either)."""
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    text = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def verify(envelope: dict, public_key: Ed25519PublicKey) -> tuple[bytes, str]:
    """(body, payload type) of an envelope one of whose signatures ``public_key`` verifies; GateError when none
    does or the envelope is malformed."""
    try:
        payload_type = envelope["payloadType"]
        body = b64decode(envelope["payload"])
        signatures = envelope["signatures"]
        if not isinstance(payload_type, str) or not isinstance(signatures, list):
            raise TypeError
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise GateError("not a DSSE envelope (payload, payloadType, signatures)") from None
    message = pae(payload_type, body)
    for s in signatures:
        try:
            public_key.verify(b64decode(s["sig"]), message)
            return body, payload_type
        except (InvalidSignature, KeyError, TypeError, ValueError, binascii.Error):
            continue
    raise GateError(f"no signature of the envelope verifies with key {keyid(public_key)[:16]}... "
                    f"({len(signatures)} signature{'s' if len(signatures) != 1 else ''})")


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM file (encrypted: passphrase in $GATE_SIGN_KEY_PASSWORD); UsageError
    otherwise."""
    data = _read(path, "--sign-key")
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--sign-key {path}: not a usable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"--sign-key {path}: an ed25519 key is needed, got {type(key).__name__}")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An ed25519 public key from a PEM file; UsageError otherwise."""
    data = _read(path, "--key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"--key {path}: an ed25519 public key is needed, got {type(key).__name__}")
    return key
