"""idna 3.7: the CONTEXTJ check scanned a label backwards and forwards from
every joiner to its ends, quadratic in the label's length (denial of service
with long crafted names)."""
PACKAGE, FROM, TO = "idna", "3.6", "3.7"
ADVISORY = "CVE-2024-3651 (GHSA-jjg7-2v4v-x38h)"
SUMMARY = "quadratic CONTEXTJ check in idna.encode"
REQUIRES = ()

import idna
from _measure import superlinear


def attempt(label):
    try:
        idna.encode(label)
    except idna.IDNAError:
        pass


def check():
    # a non-joining letter before each ZERO WIDTH NON-JOINER: every joiner scans the whole label
    return superlinear(attempt, lambda n: "a" * n + "\u200c" * n, 300)
