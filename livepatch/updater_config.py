"""The updater's configuration file (TOML): where patches come from, how
often to assess, which classifications to install by itself and when, and
how to tell, per service, that an installed patch is healthy.

    repository = "https://patches.example.com/shop"   # or a directory
    trusted_keys = "/etc/livepatch/trusted"           # verifies the catalog and bundles
    operator_key = "/etc/livepatch/ops.key"            # authorises rolling back security fixes
    state_file = "/var/lib/livepatch-updater/state.json"
    interval = "6h"                                    # between assessments
    classifications = ["security", "critical"]         # installed automatically
    canary = true                                      # one process first (services with more than one)

    [[window]]                                         # host's local time unless timezone = "Area/City"
    days = "mon-fri"
    start = "02:00"
    end = "04:30"

    [services.shop]
    observe = "60s"                                    # health is watched this long after an install
    http = ["http://127.0.0.1:8000/health"]            # each must answer 2xx
    commands = [["/usr/local/bin/check-shop", "--quick"]]   # each must exit 0
    patched_errors = 0                                 # exceptions through patched code allowed

Every mistake is one line naming the field and what it should be."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import windows

CLASSIFICATIONS = ("security", "critical", "bugfix", "other")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOP_KEYS = {"repository", "trusted_keys", "operator_key", "state_file", "cache_dir", "state_dir", "interval",
            "classifications", "canary", "timezone", "window", "services", "log_file"}
SERVICE_KEYS = {"observe", "http", "commands", "patched_errors", "canary", "timeout"}


class ConfigError(ValueError):
    """One line: the file, the field, what is wrong and what it should be."""


def duration(value, field: str, *, minimum: float = 0.0, maximum: float = 30 * 86400) -> float:
    """Seconds from 30, "30s", "5m", "6h", "1d" or "250ms"."""
    if isinstance(value, bool):
        m = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
        m = True
    else:
        m = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not m or not minimum <= seconds <= maximum:
        raise ConfigError(f"{field} must be a duration from {minimum:g}s to {maximum / 86400:g}d such as \"30s\", "
                          f"\"5m\" or \"6h\", got {str(value)[:40]!r}")
    return seconds


@dataclass
class HealthConfig:
    observe: float = 30.0
    http: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    patched_errors: int | None = 0     # None: the agent's signal is not used
    timeout: float = 5.0               # for each HTTP request and command
    canary: bool | None = None         # None: the file's default


@dataclass
class Config:
    path: str
    repository: str
    trusted_keys: str
    operator_key: str | None
    state_file: str
    cache_dir: str | None
    state_dir: str | None              # the services' state directories' root (their history)
    interval: float
    classifications: tuple[str, ...]
    canary: bool
    schedule: windows.Schedule
    services: dict[str, HealthConfig]
    log_file: str | None = None

    def health(self, service: str) -> HealthConfig:
        return self.services.get(service) or HealthConfig()

    def canary_for(self, service: str) -> bool:
        own = self.health(service).canary
        return self.canary if own is None else own


def load(path: str) -> Config:
    import tomllib
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: it is not UTF-8 text") from None
    try:
        return parse(raw, path)
    except (ConfigError, windows.WindowError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _string(raw, key, required=False):
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key} is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string, got {str(value)[:40]!r}")
    return value


def _path(raw, key, base, required=False):
    value = _string(raw, key, required)
    return None if value is None else os.path.join(base, os.path.expanduser(value))


def parse(raw: dict, path: str = "<config>") -> Config:
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    base = os.path.dirname(os.path.abspath(path))  # relative paths are relative to the file
    repository = _string(raw, "repository", required=True)
    if "://" not in repository:
        repository = os.path.join(base, os.path.expanduser(repository))
    elif not repository.startswith(("http://", "https://")):
        raise ConfigError(f"repository must be a directory or an http:// or https:// URL, got {repository[:60]!r}")
    classifications = raw.get("classifications", ["security", "critical"])
    if not isinstance(classifications, list) or not all(isinstance(c, str) for c in classifications) \
            or not set(classifications) <= set(CLASSIFICATIONS):
        raise ConfigError(f"classifications must be a list of {', '.join(CLASSIFICATIONS)}, got {str(classifications)[:60]}")
    canary = raw.get("canary", True)
    if not isinstance(canary, bool):
        raise ConfigError(f"canary must be true or false, got {str(canary)[:20]!r}")
    tz = None
    if raw.get("timezone") is not None:
        import zoneinfo
        name = _string(raw, "timezone")
        try:
            tz = zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"timezone {name[:40]!r} is not a time zone this host knows (e.g. \"Europe/Paris\"; "
                              "omit it for the host's local time)") from None
    entries = raw.get("window", [])
    if not isinstance(entries, list):
        raise ConfigError("window must be written as [[window]] tables (days, start, end)")
    schedule = windows.Schedule([windows.window_from(e, f"window[{i}]") for i, e in enumerate(entries)], tz)
    services = raw.get("services", {})
    if not isinstance(services, dict):
        raise ConfigError("services must be tables: [services.NAME]")
    state_file = _path(raw, "state_file", base) or os.path.join(_default_root(), "updater.json")
    return Config(path=os.path.abspath(path), repository=repository,
                  trusted_keys=_path(raw, "trusted_keys", base, required=True),
                  operator_key=_path(raw, "operator_key", base), state_file=state_file,
                  cache_dir=_path(raw, "cache_dir", base), state_dir=_path(raw, "state_dir", base),
                  interval=duration(raw.get("interval", "6h"), "interval", minimum=0.05),
                  classifications=tuple(classifications), canary=canary, schedule=schedule,
                  services={name: _service(name, value) for name, value in services.items()},
                  log_file=_path(raw, "log_file", base))


def _default_root() -> str:
    if os.geteuid() == 0:
        return "/var/lib/livepatch-updater"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "livepatch-updater")


def _service(name: str, raw) -> HealthConfig:
    where = f"services.{name}"
    if not _SERVICE.fullmatch(name) or ".." in name:
        raise ConfigError(f"{where}: a service name is letters, digits, '.', '_' and '-' (at most 64)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(raw) - SERVICE_KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown key {unknown[0]!r} (known: {', '.join(sorted(SERVICE_KEYS))})")
    http = raw.get("http", [])
    if isinstance(http, str):
        http = [http]
    if not isinstance(http, list) or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in http):
        raise ConfigError(f"{where}.http must be a list of http:// or https:// URLs")
    commands = raw.get("commands", [])
    if not isinstance(commands, list) or not all(
            isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in commands):
        raise ConfigError(f"{where}.commands must be a list of commands, each a list of strings "
                          "(e.g. [[\"/usr/local/bin/check\", \"--quick\"]]); no shell is used")
    errors = raw.get("patched_errors", 0)
    if errors is False:
        errors = None
    elif isinstance(errors, bool) or not isinstance(errors, int) or errors < 0:
        raise ConfigError(f"{where}.patched_errors must be the number of exceptions through patched code "
                          f"allowed while observing (0 or more), or false to not watch them; got {str(errors)[:20]!r}")
    canary = raw.get("canary")
    if canary is not None and not isinstance(canary, bool):
        raise ConfigError(f"{where}.canary must be true or false")
    return HealthConfig(observe=duration(raw.get("observe", "30s"), f"{where}.observe", maximum=86400),
                        http=list(http), commands=[list(c) for c in commands], patched_errors=errors,
                        timeout=duration(raw.get("timeout", "5s"), f"{where}.timeout", minimum=0.1, maximum=600),
                        canary=canary)
