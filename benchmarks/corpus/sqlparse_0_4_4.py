"""sqlparse 0.4.4: a regular expression of the lexer backtracked
catastrophically on long runs of certain characters (ReDoS)."""
PACKAGE, FROM, TO = "sqlparse", "0.4.3", "0.4.4"
ADVISORY = "CVE-2023-30608 (GHSA-rrm6-wvj7-cwh2)"
SUMMARY = "lexer regular expression ReDoS"
REQUIRES = ()

import sqlparse
import sqlparse.lexer
from _measure import superlinear


def check():
    # an unterminated string of backslashes: the string rule's alternatives both match a
    # backslash, so the vulnerable lexer backtracks exponentially in the run's length
    return superlinear(lambda s: list(sqlparse.lexer.tokenize(s)), lambda n: 'SELECT "' + "\\" * n, 14, factor=2,
                       power=4)  # exponential: x2 input is x300 and more; fixed, x2 (x3 when busy)
