"""requests 2.32.4: the .netrc lookup split the URL's netloc at ':' instead of
taking its host, so http://example.com:@evil.invalid/ sent example.com's
.netrc credentials to evil.invalid."""
PACKAGE, FROM, TO = "requests", "2.32.3", "2.32.4"
ADVISORY = "CVE-2024-47081 (GHSA-9hjg-9r4m-mvj7)"
SUMMARY = ".netrc credentials leaked to another host"
REQUIRES = ()
# the release also changes how header values are encoded for urllib3 2; the fix is the .netrc lookup
ONLY = ("requests.utils:get_netrc_auth",)

import os
import tempfile

import requests.utils


def check():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "netrc")
        with open(path, "w") as fh:
            fh.write("machine example.com login alice password secret\n")
        os.chmod(path, 0o600)
        old = os.environ.get("NETRC")
        os.environ["NETRC"] = path
        try:
            auth = requests.utils.get_netrc_auth("http://example.com:@evil.invalid/")
        finally:
            os.environ.pop("NETRC") if old is None else os.environ.__setitem__("NETRC", old)
    return auth is not None, f"credentials for evil.invalid: {auth}"
