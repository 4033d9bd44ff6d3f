"""A real S3 endpoint for tests: moto's server mode on 127.0.0.1, on a free port, with dummy credentials."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

# Dummy values: moto accepts any; they are never real keys.
ACCESS_KEY_ID = "testing-access-key"
SECRET_ACCESS_KEY = "testing-secret-do-not-log-3f9a"
REGION = "us-east-1"


@dataclass
class MotoS3:
    """A running moto server: its URL, a plain boto3 client on it (to set up and inspect buckets), stop()."""

    server: ThreadedMotoServer
    url: str
    client: Any
    running: bool = True

    def stop(self) -> None:
        """Stop the server: its port then refuses connections."""
        if self.running:
            self.server.stop()
            self.running = False


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 server on 127.0.0.1 (a port the OS picks), stopped on exit."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client(
        "s3", endpoint_url=url, region_name=REGION, aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    s3 = MotoS3(server, url, client)
    try:
        yield s3
    finally:
        s3.stop()


@contextmanager
def black_hole() -> Iterator[str]:
    """An endpoint URL on 127.0.0.1 that accepts TCP connections (the kernel does) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
