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


TYPES_DOMAIN = """
name = "types"
description = "One column of each Arrow type a product can hold"

[storage.files]
type = "object_store"
url = "file://../typesdata"

[[products]]
name = "all_types"
storage = "files"
location = "all_types.parquet"
format = "parquet"

[[products]]
name = "all_types_ipc"
storage = "files"
location = "all_types.arrow"
format = "arrow"
"""


def all_types_table():
    """Every Arrow type a product can hold, with a null in each column."""
    import datetime
    import decimal

    import pyarrow as pa

    def col(values, type_):
        return pa.array(values + [None], type=type_)

    ts = [datetime.datetime(2024, 2, 29, 12, 34, 56, 789012), datetime.datetime(1970, 1, 1)]
    columns = {
        "i8": col([-128, 127], pa.int8()),
        "i16": col([-32768, 32767], pa.int16()),
        "i32": col([-(2**31), 2**31 - 1], pa.int32()),
        "i64": col([-(2**63), 2**63 - 1], pa.int64()),
        "u8": col([0, 255], pa.uint8()),
        "u16": col([0, 65535], pa.uint16()),
        "u32": col([0, 2**32 - 1], pa.uint32()),
        "u64": col([0, 2**63], pa.uint64()),
        "f32": col([1.5, -0.25], pa.float32()),
        "f64": col([3.141592653589793, -1e300], pa.float64()),
        "dec": col([decimal.Decimal("12345.67"), decimal.Decimal("-0.01")], pa.decimal128(15, 2)),
        "dec38": col([decimal.Decimal("1" * 30 + ".12345678"), decimal.Decimal("0")], pa.decimal128(38, 8)),
        "d32": col([datetime.date(2024, 2, 29), datetime.date(1900, 1, 1)], pa.date32()),
        "ts_s": col(ts, pa.timestamp("s")),
        "ts_ms": col(ts, pa.timestamp("ms")),
        "ts_us": col(ts, pa.timestamp("us")),
        "ts_ns": col(ts, pa.timestamp("ns")),
        "ts_ms_utc": col(ts, pa.timestamp("ms", tz="UTC")),
        "ts_us_tz": col(ts, pa.timestamp("us", tz="Europe/Paris")),
        "t64": col([datetime.time(23, 59, 59, 999999), datetime.time(0, 0)], pa.time64("us")),
        "t32": col([datetime.time(1, 2, 3), datetime.time(0, 0)], pa.time32("ms")),
        "s": col(["héllo", ""], pa.string()),
        "ls": col(["large", "x" * 1000], pa.large_string()),
        "b": col([b"\x00\x01", b""], pa.binary()),
        "flag": col([True, False], pa.bool_()),
        "lst": col([[1, 2, None], []], pa.list_(pa.int32())),
        "st": col([{"a": 1, "b": "x"}, {"a": None, "b": None}], pa.struct([("a", pa.int64()), ("b", pa.string())])),
    }
    return pa.table(columns)


def serve(binary: str, config: pathlib.Path, out_path: pathlib.Path):
    """Starts `meshgate serve` on a free port, its stdout in `out_path`, and
    waits for its listening line. Returns the process, the open stdout file
    and that line."""
    out = open(out_path, "w")
    process = subprocess.Popen(
        [binary, "serve", "--config", str(config), "--flight-addr", "127.0.0.1:0"],
        stdout=out,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    first = ""
    while time.monotonic() < deadline and process.poll() is None:
        first = out_path.read_text().split("\n")[0]
        if first.startswith("meshgate listening on"):
            break
        time.sleep(0.05)
    return process, out, first


def serve_with_http(binary: str, config: pathlib.Path, root: pathlib.Path, *options: str):
    """Starts `meshgate [options] serve` with Flight and HTTP on free ports,
    its stdout and stderr in `root`/stdout.log and stderr.log, and waits for
    both addresses. Returns the process, the two open files, the Flight URI
    and the HTTP base URL."""
    import re

    stdout, stderr = open(root / "stdout.log", "w"), open(root / "stderr.log", "w")
    process = subprocess.Popen(
        [binary, *options, "serve", "--config", str(config), "--flight-addr", "127.0.0.1:0",
         "--http-addr", "127.0.0.1:0"],
        stdout=stdout, stderr=stderr,
    )
    flight_uri = http = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (flight_uri and http):
        assert process.poll() is None, (root / "stderr.log").read_text()
        first = (root / "stdout.log").read_text().split("\n")[0]
        if first.startswith("meshgate listening on"):
            flight_uri = first.split()[3]
        found = re.search(r"on (http://\S+)", (root / "stderr.log").read_text())
        http = found and found.group(1)
        time.sleep(0.05)
    return process, (stdout, stderr), flight_uri, http


class DemoServer:
    def __init__(self, uri: str, root: pathlib.Path, binary: str, process):
        self.uri = uri
        self.root = root
        self.data = root / "data"
        self.binary = binary
        self.process = process
        self.stdout = root / "stdout.log"

    def token(self, user: str) -> str:
        result = subprocess.run(
            [self.binary, "token", "--user", user, "--config", str(self.root / "meshgate.toml")],
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def audit(self):
        import json

        lines = self.stdout.read_text().splitlines()[1:]
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="session")
def demo_server():
    binary = meshgate_binary()
    with tempfile.TemporaryDirectory(prefix="meshgate-clients-") as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([binary, "demo", str(root), "--scale", SCALE], check=True, capture_output=True)
        import pyarrow as pa
        import pyarrow.parquet as pq

        (root / "typesdata").mkdir()
        pq.write_table(all_types_table(), root / "typesdata" / "all_types.parquet")
        with pa.ipc.new_file(root / "typesdata" / "all_types.arrow", all_types_table().schema) as writer:
            writer.write_table(all_types_table())
        (root / "domains" / "types.toml").write_text(TYPES_DOMAIN)
        # stdout carries the listening line, then the audit log: keep it in a
        # file so that the server never blocks on a full pipe.
        process, out, first = serve(binary, root / "meshgate.toml", root / "stdout.log")
        try:
            assert first.startswith("meshgate listening on grpc://"), first
            uri = first.split()[3]
            yield DemoServer(uri, root, binary, process)
        finally:
            process.terminate()
            process.wait(timeout=30)
            out.close()
