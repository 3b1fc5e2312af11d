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
    written = []
    try:
        for path, data, mode in ((key_path, priv_pem, 0o600), (pub_path, pub_pem, 0o644)):
            # O_EXCL|O_NOFOLLOW: never overwrite a key, never follow a planted symlink
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    except BaseException:
        for path in written:  # half a key pair is no use: leave nothing behind
            os.unlink(path)
        raise
    return key_path, pub_path, key_id(_public_raw(private.public_key()))


def _read_small(path: str, expect: os.stat_result | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    st = os.fstat(fd)
    if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
        os.close(fd)
        raise SignatureError(f"{path} changed while it was being checked")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SignatureError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise SignatureError(f"{path}: not a key file (larger than {MAX_KEY_FILE} bytes)")
    return data


def load_private(path: str):
    ed25519, serialization, _ = _crypto()
    data = _read_small(path)
    if b"-----BEGIN PUBLIC KEY-----" in data:
        # the usual mix-up: the .pub given where the .key belongs
        hint = f" (its private key is {path[:-4]}.key)" if path.endswith(".pub") and os.path.exists(path[:-4] + ".key") else ""
        raise SignatureError(f"{path} is a public key; signing needs the private key{hint}")
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SignatureError(f"{path}: private key is readable by others (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # cryptography's own text is a paragraph with a URL: say what the file must be
        raise SignatureError(f"{path}: not a PEM private key (give the .key file `livepatch keygen` wrote)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public(path: str, expect: os.stat_result | None = None, shown: str | None = None):
    """The public key in `path`; with `expect` (its lstat when checked), only
    if the file opened is that one (not swapped meanwhile)."""
    ed25519, serialization, _ = _crypto()
    shown = shown or path
    try:
        key = serialization.load_pem_public_key(_read_small(path, expect))
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{shown}: not a PEM public key (give a .pub file `livepatch keygen` wrote, "
                             "or a directory of them)") from None
    except OSError as exc:
        raise SignatureError(f"{shown}: cannot read it: {exc.strerror or exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{shown}: not an Ed25519 public key")
    return key


class UnsafeTrustStore(SignatureError):
    """A trust store (or a key in it) that someone else could change."""


def load_trusted(source, uid: int | None = None) -> dict:
    """Trusted public keys from a `.pub` file, a directory of them, or a
    list of either; returns {key id: public key}.

    A trust store is checked like the socket directory (agent/runtime_dir.py),
    since whoever can write to it decides which bundles run: the store, each
    key and every directory and symlink on the way to them must be root's or
    `uid`'s (default: ours) and writable by nobody else (a sticky directory
    holding only such entries, or a read-only mount, is fine). Symlinks are
    followed hop by hop under the same checks. Anything else raises
    UnsafeTrustStore naming the path and the problem; nothing is trusted."""
    if source is None:
        return {}
    uid = os.getuid() if uid is None else uid
    files = []
    for item in ([source] if isinstance(source, (str, os.PathLike)) else list(source)):
        item = os.fspath(item)
        resolved, st = _checked(item, item, uid)
        if stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(n for n in os.listdir(resolved) if n.endswith(".pub"))
            except OSError as exc:
                raise UnsafeTrustStore(f"trust store {item}: cannot list it: {exc.strerror}") from None
            if len(names) > MAX_TRUSTED_KEYS:
                raise SignatureError(f"too many trusted keys in {item} ({len(names)} > {MAX_TRUSTED_KEYS})")
            for name in names:
                files.append((os.path.join(item, name), *_checked(os.path.join(resolved, name), item, uid)))
        else:
            files.append((item, resolved, st))
    if len(files) > MAX_TRUSTED_KEYS:
        raise SignatureError(f"too many trusted keys ({len(files)} > {MAX_TRUSTED_KEYS})")
    keys = {}
    for shown, resolved, st in files:
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeTrustStore(f"trusted key {shown}: not a regular file")
        public = load_public(resolved, expect=st, shown=shown)
        keys[key_id(_public_raw(public))] = public
    return keys


def _checked(path: str, store: str, uid: int):
    """(resolved path, lstat) of `path` after every check, or UnsafeTrustStore."""
    from .agent.runtime_dir import UnsafeDirectory, check_owned, resolve_checked
    try:
        resolved, st = resolve_checked(path, uid)
        check_owned(resolved if resolved == os.path.abspath(path) else f"{resolved} (where {path} leads)", st, uid)
    except UnsafeDirectory as exc:
        raise UnsafeTrustStore(f"unsafe trust store {store}: {exc}") from None
    except FileNotFoundError as exc:
        what = "does not exist" if os.path.abspath(exc.filename or "") == os.path.abspath(path) \
            else f"leads to {exc.filename}, which does not exist"
        raise SignatureError(f"trusted key {path!r} {what}") from None
    except OSError as exc:
        raise UnsafeTrustStore(f"trust store {store}: {exc.filename or path}: {exc.strerror or exc}") from None
    return resolved, st


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
