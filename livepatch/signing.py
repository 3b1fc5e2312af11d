"""Ed25519 keys and signatures for bundles.

A key pair is two files: `NAME.key` (PKCS#8 PEM private key, mode 0600) and
`NAME.pub` (SubjectPublicKeyInfo PEM). A key is named by its id: the first
16 hex digits of SHA-256 over the raw 32-byte public key. `cryptography` is
imported only when a signature is made or checked, so a process that never
verifies a bundle never loads it."""

from __future__ import annotations

import hashlib
import os
import re
import stat

from .errors import PatchError, Problem

MAX_KEY_FILE = 4096
MAX_TRUSTED_KEYS = 256
# One spelling per signature: lower-case hex of the exact length (an Ed25519
# signature is 64 bytes, a key id 8), nothing around it.
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{128}")
_KEY_ID_HEX = re.compile(r"[0-9a-f]{16}")


class SignatureError(PatchError):
    category = "signature"


def _crypto():
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519, serialization, InvalidSignature


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(public_key) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate(path_prefix: str) -> tuple[str, str, str]:
    """Write PREFIX.key (0600, created exclusively) and PREFIX.pub; returns
    (private path, public path, key id)."""
    ed25519, serialization, _ = _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    priv_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    pub_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    key_path, pub_path = path_prefix + ".key", path_prefix + ".pub"
    for path, data, mode in ((key_path, priv_pem, 0o600), (pub_path, pub_pem, 0o644)):
        # O_EXCL|O_NOFOLLOW: never overwrite a key, never follow a planted symlink
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return key_path, pub_path, key_id(_public_raw(private.public_key()))


def _read_small(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise SignatureError(f"{path}: not a key file (larger than {MAX_KEY_FILE} bytes)")
    return data


def load_private(path: str):
    ed25519, serialization, _ = _crypto()
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SignatureError(f"{path}: private key is readable by others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(_read_small(path), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public(path: str):
    ed25519, serialization, _ = _crypto()
    try:
        key = serialization.load_pem_public_key(_read_small(path))
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def load_trusted(source) -> dict:
    """Trusted public keys from a `.pub` file, a directory of them, or a
    list of either; returns {key id: public key}."""
    if source is None:
        return {}
    paths = []
    for item in ([source] if isinstance(source, (str, os.PathLike)) else list(source)):
        item = os.fspath(item)
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, n) for n in os.listdir(item) if n.endswith(".pub"))
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise SignatureError(f"trusted key {item!r} does not exist")
    if len(paths) > MAX_TRUSTED_KEYS:
        raise SignatureError(f"too many trusted keys ({len(paths)} > {MAX_TRUSTED_KEYS})")
    keys = {}
    for path in paths:
        public = load_public(path)
        keys[key_id(_public_raw(public))] = public
    return keys


def sign(private_key, message: bytes) -> dict:
    return {"algorithm": "ed25519", "key_id": key_id(_public_raw(private_key.public_key())),
            "signature": private_key.sign(message).hex()}


def form_problem(signature: dict) -> str | None:
    """Why `signature`'s key_id or signature is not in canonical form (None
    if both are)."""
    kid, sig = signature.get("key_id"), signature.get("signature")
    if not isinstance(kid, str) or not _KEY_ID_HEX.fullmatch(kid):
        return "key_id must be 16 lower-case hex digits"
    if not isinstance(sig, str) or not _SIGNATURE_HEX.fullmatch(sig):
        return "signature must be 128 lower-case hex digits"
    return None


def verify(signature: dict, message: bytes, trusted: dict) -> str:
    """Check `signature` over `message` with one of the trusted keys;
    returns the key id or raises SignatureError."""
    _, _, InvalidSignature = _crypto()
    problem = form_problem(signature)
    if problem is not None:
        raise SignatureError(f"bundle signature is not in canonical form: {problem}", [Problem("signature", "", problem)])
    kid = signature.get("key_id")
    public = trusted.get(kid)
    if public is None:
        raise SignatureError("bundle is signed by an untrusted key",
                             [Problem("signature", "", f"key {kid} is not among the trusted keys ({', '.join(sorted(trusted)) or 'none configured'})")])
    try:
        public.verify(bytes.fromhex(signature["signature"]), message)
    except (InvalidSignature, ValueError):
        raise SignatureError("bundle signature does not verify: the manifest was altered or signed by another key",
                             [Problem("signature", "", f"key {kid}")]) from None
    return kid
