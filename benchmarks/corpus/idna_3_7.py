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
    # ZERO WIDTH NON-JOINERs between non-joining letters, with a dual-joining letter at each end:
    # the vulnerable check scans past the letters to the label's ends for every joiner
    return superlinear(attempt, lambda n: "\u0628" + "a\u200c" * n + "\u0628", 300)
