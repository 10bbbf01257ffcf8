"""One frozen settings object, read from the environment at entry points and passed down.

S3 credentials and endpoints are NOT here: boto3 reads the standard AWS
variables and config files (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION, ...)
itself, so they never pass through s3ferry's own objects, messages or tables.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping

from models import exceptions

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_UNITS = {"": 1, "b": 1, "k": KiB, "kb": 1000, "kib": KiB, "m": MiB, "mb": 1000**2, "mib": MiB,
          "g": GiB, "gb": 1000**3, "gib": GiB, "t": TiB, "tb": 1000**4, "tib": TiB}

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/s3ferry"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/1"

#: Settings never shown (repr, logs).
SECRETS = ("signer_key",)
#: Set by from_env(), never read from the environment.
_DERIVED = ("local",)
#: Settings that may be unset (None), and the type they take when set.
_OPTIONAL: dict[str, type] = {"window_initial": int}


class SettingsError(exceptions.UserError, ValueError):
    """A setting is invalid; nothing was started."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: `low` (excluded if `above`) to `high`, finite."""

    low: float
    high: float
    unit: str = ""
    above: bool = False

    def __contains__(self, value: float) -> bool:
        if (isinstance(value, float) and not math.isfinite(value)) or value > self.high:
            return False
        return value > self.low if self.above else value >= self.low

    def __str__(self) -> str:
        low, high = _amount(self.low, self.unit if self.unit == "bytes" else ""), _amount(self.high, self.unit)
        return f"more than {low} and at most {high}" if self.above else f"from {low} to {high}"


#: Every numeric setting's range (checked at start; the relations between settings come after).
RANGES = {
    "part_size": Range(5 * MiB, 5 * GiB, "bytes"),  # S3's limits
    "max_active_uploads": Range(1, 100_000),
    "max_retries": Range(0, 1000),
    "max_upload_retries": Range(0, 1_000_000),
    "lease_seconds": Range(1, 86400, "seconds"),
    "stall_seconds": Range(1, 7 * 86400, "seconds"),
    "reconcile_interval": Range(1, 86400, "seconds"),
    "sweep_after_seconds": Range(60, 10 * 365 * 86400, "seconds"),
    "soft_shutdown_seconds": Range(0, 86400, "seconds"),
    "retry_backoff_base": Range(0, 86400, "seconds", above=True),
    "retry_backoff_max": Range(0, 86400, "seconds", above=True),
    "window_initial": Range(1, 10_000),
    "window_min": Range(1, 10_000),
    "window_max": Range(1, 10_000),
    "window_target_seconds": Range(0, 86400, "seconds", above=True),
    "window_lease_seconds": Range(1, 3600, "seconds"),
    "window_wait_seconds": Range(0.1, 3600, "seconds"),
    "presign_expiry_seconds": Range(1, 7 * 86400, "seconds"),  # SigV4's maximum
    "heartbeat_seconds": Range(0.1, 60, "seconds"),
    "liveness_seconds": Range(0.2, 86400, "seconds"),
    "recovery_interval": Range(0.5, 300, "seconds"),
}

#: A Celery queue name that Redis, RabbitMQ (AMQP: at most 255 bytes) and a log line all take as is.
QUEUE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,200}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything s3ferry reads from its environment (`S3FERRY_*`)."""

    #: SQLAlchemy URL of the state database (the source of truth).
    database_url: str = DEFAULT_DATABASE_URL
    #: Celery broker: where part tasks wait.
    broker_url: str = DEFAULT_BROKER_URL
    #: Celery result backend: where the chord counts finished parts.
    result_backend: str = DEFAULT_RESULT_BACKEND
    #: Celery queue the part and completion tasks go to.
    queue: str = "s3ferry"
    #: Default part size of new uploads (raised automatically past 10,000 parts).
    part_size: int = 32 * MiB
    #: How many uploads run at once (the rest wait, queued): 1 is one file at a time,
    #: with its parts in parallel. Raise it for large fleets.
    max_active_uploads: int = 1
    #: Retries of one part (transient errors) before its upload fails (`--max-retries`).
    max_retries: int = 8
    #: Retries of all the parts of one upload together before it fails.
    max_upload_retries: int = 100
    #: How long a worker's claim on a part lasts without being renewed (it is renewed every
    #: third of this while the part is sent): how soon a dead worker's part is taken over.
    lease_seconds: int = 120
    #: An upload with no part activity for this long is stalled: the reconciler looks at
    #: S3 (ListParts) and dispatches its missing parts again.
    stall_seconds: int = 180
    #: How often the reconciler runs (Celery beat), in seconds.
    reconcile_interval: int = 30
    #: Failed uploads keep their S3 parts this long (for `s3ferry retry`); then the sweeper
    #: aborts them. Also the age past which unknown multipart uploads may be swept.
    sweep_after_seconds: int = 24 * 3600
    #: On SIGTERM, parts in flight get this long to finish (Celery's soft shutdown; Celery
    #: waits the whole time when any task was running). Keep it below the grace period of
    #: docker-compose (stop_grace_period) or Kubernetes (terminationGracePeriodSeconds).
    soft_shutdown_seconds: float = 60.0
    #: Backoff of part retries: base and cap, in seconds (full jitter).
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 120.0
    #: The AIMD window of parts in flight to one destination (endpoint + bucket), shared by the
    #: fleet through Redis (workers/window.py): where it starts, and its bounds. A part that
    #: lands within window_target_seconds (for 32 MiB; scaled to larger parts) adds 1; SlowDown,
    #: throttling, timeouts and connection errors halve it. MIN = MAX fixes it. Unset, a new
    #: window starts at the concurrency of the worker that opens it (its first parts go together).
    window_initial: int | None = None
    window_min: int = 1
    window_max: int = 32
    window_target_seconds: float = 30.0
    #: A part's slot in the window is a lease renewed while it is sent: a dead worker's
    #: slot frees after this long.
    window_lease_seconds: float = 30.0
    #: How long a part task waits for a slot before it steps aside (requeued, no retry counted).
    window_wait_seconds: float = 20.0
    #: Presigned mode: part workers hold no S3 credentials; `s3ferry signer` (which does) signs
    #: each part's UploadPart URL when asked, valid for presign_expiry_seconds.
    presigned: bool = False
    presign_expiry_seconds: int = 300
    #: The folders whose files workers may read, separated by ":" (os.pathsep). A source must
    #: resolve (symlinks and `..` followed) to a regular file under one of them. Unset in a
    #: fleet: every source is refused until it is set. Single-machine mode: "/" (the user's
    #: own workers read what the user can read). /proc, /sys and /dev are refused always.
    source_roots: str = ""
    #: The buckets workers may send to: names or patterns with `*` (fnmatch), comma-separated.
    #: Unset in a fleet: every upload is refused until it is set. Single-machine mode: "*".
    buckets: str = ""
    #: S3 endpoints (scheme://host[:port]) workers may send to besides their own configured one
    #: (AWS_ENDPOINT_URL, or AWS itself when that is unset), comma-separated.
    endpoints: str = ""
    #: Presigned mode: the key that authenticates the signer's replies (HMAC-SHA256), shared by
    #: the signer and the workers through their own configuration (never Redis, never the
    #: database). At least 32 characters.
    signer_key: str = ""
    #: How often each worker process stamps its liveness record in the database.
    heartbeat_seconds: float = 2.0
    #: A worker process whose liveness record is older than this is dead: its claims are
    #: released and its parts dispatched again. At least twice heartbeat_seconds (a lease
    #: shorter than this releases a hung worker's claims first).
    liveness_seconds: float = 6.0
    #: How often every worker runs the light recovery pass (dead holders' claims, lost
    #: dispatches), one pass at a time fleet-wide.
    recovery_interval: float = 2.0
    #: Single-machine mode's data folder (SQLite state, the private Redis server, logs).
    #: Default: the user's data folder, e.g. ~/.local/share/s3ferry.
    home: str = ""
    #: Single-machine mode: neither S3FERRY_DATABASE_URL nor S3FERRY_BROKER_URL is set, so the
    #: state lives in `home` and each `s3ferry upload` runs its own workers (orchestrator/local.py).
    local: bool = False
    #: Workers send Celery task events from their start (for Flower or `celery events`); off by
    #: default, as each event is a Redis publish per task. Flower turns them on while it runs.
    task_events: bool = False

    def __post_init__(self) -> None:
        for name, allowed in RANGES.items():
            if getattr(self, name) is not None or name not in _OPTIONAL:
                _check_range(name, getattr(self, name), allowed, _OPTIONAL.get(name) or type(_DEFAULTS[name]))
        if not QUEUE_NAME.fullmatch(self.queue):
            raise SettingsError(f"S3FERRY_QUEUE ({_short(repr(self.queue))}) is not a valid queue name: 1 to 200 "
                                "characters of A-Z a-z 0-9 . _ : - (no spaces or newlines)")
        self._check_relations()
        self._check_policy()
        for name in ("broker_url", "result_backend"):
            url = getattr(self, name)
            if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
                raise SettingsError(f"S3FERRY_{name.upper()}: a rediss:// URL needs ssl_cert_reqs=required (and "
                                    "ssl_ca_certs=/path/to/ca.pem for a private CA): without it the certificate "
                                    "is not checked")

    def _check_policy(self) -> None:
        for root in self.source_root_list:
            if not os.path.isabs(root):
                raise SettingsError(f"S3FERRY_SOURCE_ROOTS: {_short(repr(root))} is not an absolute path")
        for endpoint in self.endpoint_list:
            if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", endpoint):
                raise SettingsError(f"S3FERRY_ENDPOINTS: {_short(repr(endpoint))} is not an endpoint: "
                                    "expected scheme://host[:port], like https://minio.internal:9000")
        for pattern in self.bucket_patterns:
            if not re.fullmatch(r"[a-z0-9.*-]{1,63}", pattern):
                raise SettingsError(f"S3FERRY_BUCKETS: {_short(repr(pattern))} is not a bucket name or pattern "
                                    "(lowercase letters, digits, dots, hyphens, and * as a wildcard)")
        if self.signer_key and len(self.signer_key) < 32:
            raise SettingsError("S3FERRY_SIGNER_KEY must be at least 32 characters (for example the output of "
                                "`openssl rand -hex 32`)")

    @property
    def source_root_list(self) -> list[str]:
        """The configured source roots (absolute paths, as given)."""
        return [root for root in self.source_roots.split(os.pathsep) if root.strip()]

    @property
    def bucket_patterns(self) -> list[str]:
        return [b.strip() for b in self.buckets.split(",") if b.strip()]

    @property
    def endpoint_list(self) -> list[str]:
        return [e.strip().rstrip("/") for e in self.endpoints.split(",") if e.strip()]

    def _check_relations(self) -> None:
        if not self.stall_seconds > max(self.lease_seconds, self.retry_backoff_max):
            raise SettingsError(
                f"S3FERRY_STALL_SECONDS ({self.stall_seconds}) must be longer than S3FERRY_LEASE_SECONDS "
                f"({self.lease_seconds}) and S3FERRY_RETRY_BACKOFF_MAX ({self.retry_backoff_max}): "
                "otherwise healthy uploads look stalled")
        if not self.retry_backoff_base <= self.retry_backoff_max:
            raise SettingsError(f"S3FERRY_RETRY_BACKOFF_BASE ({self.retry_backoff_base}) must be at most "
                                f"S3FERRY_RETRY_BACKOFF_MAX ({self.retry_backoff_max})")
        if self.window_initial is None:
            if not self.window_min <= self.window_max:
                raise SettingsError(f"S3FERRY_WINDOW_MIN ({self.window_min}) must be at most "
                                    f"S3FERRY_WINDOW_MAX ({self.window_max})")
        elif not self.window_min <= self.window_initial <= self.window_max:
            raise SettingsError(
                f"the window settings must satisfy 1 <= S3FERRY_WINDOW_MIN ({self.window_min}) <= "
                f"S3FERRY_WINDOW_INITIAL ({self.window_initial}) <= S3FERRY_WINDOW_MAX ({self.window_max})")
        if not 2 * self.heartbeat_seconds <= self.liveness_seconds:
            raise SettingsError(
                f"S3FERRY_LIVENESS_SECONDS ({self.liveness_seconds}) must be at least twice S3FERRY_HEARTBEAT_SECONDS "
                f"({self.heartbeat_seconds}): otherwise a live worker that misses one beat looks dead")

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={mask_password(str(getattr(self, f.name)))!r}" if f.name.endswith(("_url", "backend"))
                           else f"{f.name}={'***' if getattr(self, f.name) else ''!r}" if f.name in SECRETS
                           else f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"Settings({fields})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = env.get("S3FERRY_" + field.name.upper())
            if raw is None or raw == "" or field.name in _DERIVED:
                continue
            values[field.name] = _parse(field.name, raw, _OPTIONAL.get(field.name) or type(field.default))
        values["home"] = os.path.realpath(os.path.expanduser(str(values.get("home") or default_home())))
        given = [name for name in ("database_url", "broker_url") if name in values]
        if not given:
            if values.get("presigned"):
                raise SettingsError("S3FERRY_PRESIGNED needs a fleet (S3FERRY_DATABASE_URL and S3FERRY_BROKER_URL): "
                                    "on one machine the workers use this machine's credentials")
            values.update(local_urls(str(values["home"])), local=True)
            # the user's own workers, for the user's own uploads: what the user can read, any bucket
            values.setdefault("source_roots", "/")
            values.setdefault("buckets", "*")
        elif len(given) == 1:
            missing = "broker_url" if given == ["database_url"] else "database_url"
            raise SettingsError(f"S3FERRY_{given[0].upper()} is set but S3FERRY_{missing.upper()} is not: set both "
                                "(a worker fleet) or neither (single-machine mode, state in S3FERRY_HOME)")
        elif "result_backend" not in values and str(values["broker_url"]).startswith(("redis://", "rediss://")):
            values["result_backend"] = values["broker_url"]  # chord counters beside the queue
        return cls(**values)


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Settings)}


def default_home() -> str:
    """The user's data folder for s3ferry (platformdirs: XDG on Linux, Application Support on macOS)."""
    import platformdirs

    return platformdirs.user_data_dir("s3ferry", appauthor=False)


def local_urls(home: str) -> dict[str, str]:
    """Single-machine mode's database and Redis URLs, derived from the data folder alone, so the
    command and the workers it starts agree without passing anything around."""
    sock = broker_socket(home)
    import sqlalchemy as sa

    state = sa.URL.create("sqlite", database=os.path.join(home, "state.db")).render_as_string()  # escaped
    return {"database_url": state,
            "broker_url": f"redis+socket://{sock}",
            # Celery's result backend spells a unix socket socket:///path; db 1 beside the queue's 0
            "result_backend": f"socket://{sock}?virtual_host=1"}


def broker_socket(home: str) -> str:
    """The private Redis server's unix socket: in the data folder, or, when that path is too long
    for a socket (about 100 bytes) or would need quoting in a URL, in a folder of the user's own
    in the temp folder (single-machine mode checks that it is private before it uses it)."""
    path = os.path.join(home, "broker", "redis.sock")
    if len(path.encode()) <= 100 and re.fullmatch(r"[A-Za-z0-9._/-]+", path):
        return path
    import hashlib
    import tempfile

    digest = hashlib.sha256(home.encode()).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"s3ferry-{uid}-{digest}", "redis.sock")


def mask_password(url: str) -> str:
    """`scheme://user:secret@host/...` -> `scheme://user:***@host/...`."""
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]+@", r"\1***@", url)


def _parse(name: str, raw: str, kind: type) -> object:
    if kind is str:
        return raw
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise SettingsError(f"S3FERRY_{name.upper()}={raw!r} is not a valid boolean (use 1 or 0)")
        return lowered in ("1", "true", "yes", "on")
    try:
        value = parse_size(raw) if name == "part_size" else kind(raw.strip())
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        what = "a valid size" if name == "part_size" else "a whole number" if kind is int else "a finite number"
        raise SettingsError(f"S3FERRY_{name.upper()}={_short(repr(raw))} is not {what}: it must be {RANGES[name]}")
    return value


def _check_range(name: str, value: object, allowed: Range, kind: type) -> None:
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole or (kind is float and isinstance(value, float)):
        if value in allowed:
            return
        problem = f"must be {allowed}"
    else:
        problem = f"must be {'a whole number' if kind is int else 'a number'} {allowed}"
    sized = allowed.unit == "bytes" and whole and 0 <= value < 2**63  # type: ignore[operator]
    shown = format_size(value) if sized else repr(value)  # type: ignore[arg-type]
    raise SettingsError(f"S3FERRY_{name.upper()} ({_short(shown)}) {problem}")


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _amount(value: float, unit: str) -> str:
    """5 MiB, 86400 seconds, 0.1 seconds, 1000."""
    if unit == "bytes":
        scale, name = next((s, n) for s, n in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB"), (1, "B")) if value % s == 0)
        return f"{int(value // scale)} {name}"
    number = f"{int(value)}" if value == int(value) else f"{value:g}"
    return f"{number} {unit}".rstrip()


def parse_size(text: str) -> int:
    """'32MiB', '32M', '64mb', '5368709120' -> bytes. K/M/G/T alone are binary (as rclone and aws)."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if not value >= 0:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit, like 32MiB")
    if not value < 2**63:  # 1e400 is inf: int() would raise OverflowError
        raise ValueError(f"invalid size {text!r}: too large (S3's largest object is 5 TiB)")
    return int(value)


def format_size(n: float) -> str:
    """Bytes as a short human string: 1.5 GiB."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
