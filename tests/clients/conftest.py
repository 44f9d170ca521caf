"""A meshgate serving the demo mesh (small scale) on a free port, started once
per test session with the binary the test command built."""

import os
import pathlib
import subprocess
import tempfile
import time

import pytest

SCALE = "0.01"


def meshgate_binary() -> str:
    binary = os.environ.get("MESHGATE_BIN")
    if binary:
        return binary
    target = os.environ.get("CARGO_TARGET_DIR") or str(pathlib.Path(__file__).parents[2] / "target")
    return str(pathlib.Path(target) / "debug" / "meshgate")


class DemoServer:
    def __init__(self, uri: str, root: pathlib.Path):
        self.uri = uri
        self.root = root
        self.data = root / "data"


@pytest.fixture(scope="session")
def demo_server():
    binary = meshgate_binary()
    with tempfile.TemporaryDirectory(prefix="meshgate-clients-") as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([binary, "demo", str(root), "--scale", SCALE], check=True, capture_output=True)
        # stdout carries the listening line, then the audit log: keep it in a
        # file so that the server never blocks on a full pipe.
        out_path = root / "stdout.log"
        out = open(out_path, "w")
        process = subprocess.Popen(
            [binary, "serve", "--config", str(root / "meshgate.toml"), "--flight-addr", "127.0.0.1:0"],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            first = ""
            while time.monotonic() < deadline and process.poll() is None:
                first = out_path.read_text().split("\n")[0]
                if first.startswith("meshgate listening on grpc://"):
                    break
                time.sleep(0.05)
            assert first.startswith("meshgate listening on grpc://"), first
            uri = first.split()[3]
            yield DemoServer(uri, root)
        finally:
            process.terminate()
            process.wait(timeout=30)
            out.close()
