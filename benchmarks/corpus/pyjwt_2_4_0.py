"""PyJWT 2.4.0: HMAC key preparation refused only some public-key formats, so
an application verifying with algorithms taken from the token accepted a
token HMAC-signed with its own (public) SSH or EC key (algorithm confusion)."""
PACKAGE, FROM, TO = "pyjwt", "2.3.0", "2.4.0"
ADVISORY = "CVE-2022-29217 (GHSA-ffqj-6fqr-9h24)"
SUMMARY = "HMAC accepts an asymmetric public key (algorithm confusion)"
REQUIRES = ()

import jwt

PUBLIC = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBn5DRLzsf5QpkF3kXLsWcDSJ6Yyda2yI6lXOlfSzFha user@example"


def check():
    try:
        token = jwt.encode({"admin": True}, PUBLIC, algorithm="HS256")
        claims = jwt.decode(token, PUBLIC, algorithms=["HS256", "EdDSA"])
    except jwt.exceptions.InvalidKeyError as exc:
        return False, f"refused: {exc}"
    return claims.get("admin") is True, f"forged token accepted: {claims}"
