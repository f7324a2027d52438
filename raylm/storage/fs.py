"""pyarrow.fs filesystems for storage URIs, configured only from the environment, with errors turned into one line.

Endpoint and credentials come from the standard variables and nothing else: `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (an S3-speaking server such as MinIO), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_REGION`; for gs://, `GOOGLE_APPLICATION_CREDENTIALS` and `STORAGE_EMULATOR_HOST`.
Credentials are never read by raylm itself (the AWS and Google SDKs inside pyarrow read them), and every
message built from a storage error is scrubbed of their values before it is shown.

The first call on a bucket is a probe (does the bucket exist, may we see it) run under a deadline of
PROBE_TIMEOUT_S, so an endpoint that does not answer fails within that time, naming the endpoint variable.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import urlsplit

from raylm.errors import StorageError
from raylm.storage.uri import StorageUri

PROBE_TIMEOUT_S = 15.0  # the first contact with a bucket fails within this, naming the endpoint variable
CONNECT_TIMEOUT_S = (
    4.0  # also the request timeout: on Linux curl's low-speed limit, so a stalled read fails too
)
MAX_ATTEMPTS = 3  # the SDK's retries on a failed request (with backoff)
ENDPOINT_VARS = {"s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), "gs": ("STORAGE_EMULATOR_HOST",)}
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
UNREACHABLE = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Could not connect",
    "Couldn't connect",
    "timed out",
    "Timeout",
)
DENIED = (
    "ACCESS_DENIED",
    "AccessDenied",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "403",
    "Forbidden",
    "PERMISSION_DENIED",
)
NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist")

T = TypeVar("T")
_PROBED: set[tuple] = set()  # (scheme, endpoint, bucket) this process has reached


def endpoint(scheme: str) -> tuple[str, str]:
    """(variable, value) of the endpoint setting in use for a scheme, or ('', '') for the provider's default."""
    for name in ENDPOINT_VARS[scheme]:
        if os.environ.get(name):
            return name, os.environ[name]
    return "", ""


def filesystem(uri: StorageUri):
    """The pyarrow filesystem for the URI's scheme, built from the current environment; the bucket is probed once."""
    fs = _build(uri.scheme)
    key = (uri.scheme, endpoint(uri.scheme)[1], uri.bucket)
    if key not in _PROBED:
        _probe(fs, uri)
        _PROBED.add(key)
    return fs


def _build(scheme: str):
    import pyarrow.fs as pafs

    name, value = endpoint(scheme)
    parts = urlsplit(value if "://" in value else f"//{value}") if value else None
    where = (
        {"endpoint_override": parts.netloc.rpartition("@")[2], "scheme": parts.scheme or None}
        if parts
        else {}
    )
    if scheme == "gs":
        from datetime import timedelta

        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=PROBE_TIMEOUT_S), **where)
    region = (
        os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or ("us-east-1" if name else None)
    )
    return pafs.S3FileSystem(
        region=region,
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=CONNECT_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        **where,
    )


def _probe(fs, uri: StorageUri) -> None:
    """The bucket must exist and be visible; an endpoint that does not answer fails within PROBE_TIMEOUT_S."""
    import pyarrow.fs as pafs

    info = with_deadline(lambda: fs.get_file_info(uri.bucket), uri, "reach the bucket of")
    if info.type == pafs.FileType.NotFound:
        raise StorageError(
            f"bucket {uri.bucket} of {uri} does not exist{_at_endpoint(uri.scheme)}; create it or fix the URI"
        )


def with_deadline(call: Callable[[], T], uri: StorageUri, what: str, timeout_s: float | None = None) -> T:
    """call() in a helper thread (pyarrow releases the GIL); StorageError when it has not returned in timeout_s
    (default PROBE_TIMEOUT_S). The abandoned thread is a daemon: it ends with its request or with the process."""
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=run, name="raylm-storage-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise StorageError(
            f"the storage endpoint for {uri} did not answer within {timeout_s:.0f} s"
            f"{_at_endpoint(uri.scheme)}; {_endpoint_fix(uri.scheme)}"
        )
    if "error" in box:
        with storage_errors(uri, what):
            raise box["error"]
    return box["value"]


@contextmanager
def storage_errors(uri: StorageUri, what: str) -> Iterator[None]:
    """Turn a pyarrow storage error into one StorageError line: unreachable endpoint, denied, missing bucket."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(describe(exc, uri, what)) from None


def describe(exc: BaseException, uri: StorageUri, what: str) -> str:
    """One line for a storage error, scrubbed of credential values."""
    text = scrub(str(exc))
    if any(mark in text for mark in UNREACHABLE):
        return (
            f"cannot {what} {uri}: the storage endpoint does not answer{_at_endpoint(uri.scheme)}; "
            f"{_endpoint_fix(uri.scheme)}"
        )
    if any(mark in text for mark in NO_BUCKET):
        return (
            f"cannot {what} {uri}: bucket {uri.bucket} does not exist{_at_endpoint(uri.scheme)}; create it or "
            f"fix the URI"
        )
    if any(mark in text for mark in DENIED):
        return (
            f"cannot {what} {uri}: access to bucket {uri.bucket} is denied; check that the credentials in the "
            f"environment ({_credential_vars(uri.scheme)}) may use it"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"cannot {what} {uri}: {first}"


def scrub(text: str) -> str:
    """text with the value of every credential variable replaced by '***'."""
    for name in SECRET_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _at_endpoint(scheme: str) -> str:
    name, value = endpoint(scheme)
    if not name:
        return ""
    parts = urlsplit(value if "://" in value else f"//{value}")
    shown = (
        parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().lstrip("/")
    )  # never user:password@
    return f" (endpoint {shown} from {name})"


def _endpoint_fix(scheme: str) -> str:
    name, _ = endpoint(scheme)
    if name:
        return f"check that {name} names a running storage server and that this machine can reach it"
    first = ENDPOINT_VARS[scheme][-1]
    return f"check the network, or set {first} to your storage server"


def _credential_vars(scheme: str) -> str:
    return "GOOGLE_APPLICATION_CREDENTIALS" if scheme == "gs" else "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
