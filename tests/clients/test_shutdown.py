"""SIGTERM drains: a stream that is running when the gateway is told to stop
is delivered whole, new connections are refused, and the process exits
cleanly; a stream that outlives `server.shutdown_timeout` is cut off at the
deadline. (pyarrow's Flight client: see the note on ADBC in the README.)"""

import json
import pathlib
import signal
import subprocess
import tempfile
import time

import pyarrow.flight as flight
import pytest

from conftest import SCALE, meshgate_binary, serve

# About 1.2M rows at the test scale: long enough to be mid-stream at SIGTERM.
LONG = (
    "SELECT a.l_orderkey, a.l_comment FROM sales.lineitem a "
    "CROSS JOIN (SELECT l_linenumber FROM sales.lineitem LIMIT 20) b"
)


@pytest.fixture(scope="module")
def root():
    with tempfile.TemporaryDirectory(prefix="meshgate-shutdown-") as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([meshgate_binary(), "demo", str(root), "--scale", SCALE], check=True, capture_output=True)
        yield root


def start(root: pathlib.Path, shutdown_timeout: str, log: str):
    config = root / "meshgate.toml"
    text = config.read_text()
    config.write_text(text.replace("[server]\n", f'[server]\nshutdown_timeout = "{shutdown_timeout}"\n', 1))
    try:
        process, out, first = serve(meshgate_binary(), config, root / log)
    finally:
        config.write_text(text)
    assert first.startswith("meshgate listening on grpc://"), first
    return process, out, first.split()[3]


def statement_query(sql: str) -> bytes:
    """A Flight SQL CommandStatementQuery in a protobuf Any."""

    def field(number: int, payload: bytes) -> bytes:
        length, varint = len(payload), bytearray()
        while True:
            byte = length & 0x7F
            length >>= 7
            varint.append(byte | (0x80 if length else 0))
            if not length:
                return bytes([number << 3 | 2]) + bytes(varint) + payload

    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    return field(1, type_url) + field(2, field(1, sql.encode()))


def stream(root: pathlib.Path, uri: str, sql: str):
    """pyarrow's Flight client, as carol (who sees every row): the reader of
    `sql`'s results."""
    token = subprocess.run(
        [meshgate_binary(), "token", "--user", "carol", "--config", str(root / "meshgate.toml")],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    client = flight.FlightClient(uri)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    info = client.get_flight_info(flight.FlightDescriptor.for_command(statement_query(sql)), options)
    return client, client.do_get(info.endpoints[0].ticket, options)


def test_sigterm_during_a_stream_delivers_it_whole_then_exits(root):
    process, out, uri = start(root, "30s", "drain.log")
    try:
        client, reader = stream(root, uri, "SELECT count(*) AS n FROM sales.lineitem")
        expected = reader.read_all().column(0)[0].as_py() * 20
        client, reader = stream(root, uri, LONG)
        rows = reader.read_chunk().data.num_rows
        process.send_signal(signal.SIGTERM)
        # New connections are refused while the stream drains.
        time.sleep(0.3)
        with pytest.raises(Exception):
            stream(root, uri, "SELECT 1")
        for chunk in reader:
            rows += chunk.data.num_rows
        assert rows == expected
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        out.close()


def test_a_stream_longer_than_the_shutdown_timeout_is_cut_off(root):
    process, out, uri = start(root, "1s", "deadline.log")
    try:
        client, reader = stream(root, uri, LONG)
        reader.read_chunk()
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # The client stops reading, so the stream cannot finish in time.
        assert process.wait(timeout=20) == 0
        waited = time.monotonic() - signalled
        assert 0.9 <= waited < 10, waited
        # The query was stopped, and audited as such.
        audit = [json.loads(line) for line in (root / "deadline.log").read_text().splitlines()[1:]]
        assert [a["outcome"] for a in audit if a["sql"] == LONG] == ["cancelled"]
    finally:
        if process.poll() is None:
            process.kill()
        out.close()


def test_sigterm_during_an_adbc_stream_delivers_it_whole(root):
    import adbc_driver_flightsql.dbapi as flightsql

    process, out, uri = start(root, "30s", "adbc-drain.log")
    try:
        with flightsql.connect(uri, db_kwargs={"username": "carol", "password": "carol-demo"}) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM sales.lineitem")
                expected = cur.fetchone()[0] * 20
                cur.execute(LONG)
                reader = cur.fetch_record_batch()
                rows = reader.read_next_batch().num_rows
                process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                # The open connection still answers, but takes no new query.
                with conn.cursor() as other:
                    with pytest.raises(Exception, match="shutting down"):
                        other.execute("SELECT 1")
                for batch in reader:
                    rows += batch.num_rows
                    time.sleep(0.001)  # a client slower than the server
                assert rows == expected
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        out.close()
