"""A real S3 API for the tests: moto's server (from PyPI, `moto[server]`) in its own process on 127.0.0.1, spoken to
through s3fs exactly as AWS is (the endpoint and the credentials from the usual environment variables). Nothing of
ours is mocked; the server is the only stand-in, and it speaks the S3 wire protocol.

`S3Server.start()` picks a free port and waits until the server answers; `env` is what a child process (torchrun,
`ditpipe` on the command line) needs; `bucket(name)` makes a bucket; `stop()` ends the process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

# Dummy credentials: moto accepts any; they are what the tests check never reaches a log, manifest or checkpoint.
ACCESS_KEY, SECRET_KEY = "AKIAditpipeTESTKEY01", "ditpipe-test-secret-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout:.0f} s")

    def bucket(self, name: str) -> str:
        """Make bucket `name` (fresh per test: names are unique); returns `s3://name`."""
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False).mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
