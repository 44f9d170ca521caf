"""Config reload in a running gateway, seen by an ADBC client: an edited
domain file is picked up by itself, SIGHUP reloads, a broken config is
rejected (logged as JSON) and the running config stays."""

import json
import pathlib
import re
import signal
import subprocess
import tempfile
import time
import urllib.request

import adbc_driver_flightsql.dbapi as flightsql
import pytest

from conftest import SCALE, meshgate_binary, serve_with_http

REVOKE = ("access = \"has_group('analyst') OR has_group('crm')\"\nrow_filter = \"c_region",
          "access = \"has_group('crm')\"\nrow_filter = \"c_region")


@pytest.fixture(scope="module")
def gateway():
    with tempfile.TemporaryDirectory(prefix="meshgate-reload-") as tmp:
        root = pathlib.Path(tmp)
        binary = meshgate_binary()
        subprocess.run([binary, "demo", str(root), "--scale", SCALE], check=True, capture_output=True)
        process, files, flight_uri, http = serve_with_http(
            binary, root / "meshgate.toml", root, "--log-format", "json"
        )
        try:
            yield root, process, flight_uri, http
        finally:
            process.terminate()
            process.wait(timeout=30)
            for file in files:
                file.close()


def customers(uri: str, user: str) -> int:
    with flightsql.connect(uri, db_kwargs={"username": user, "password": f"{user}-demo"}) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM crm.customer")
            return cur.fetchone()[0]


def log_events(root: pathlib.Path):
    """The JSON log lines on stderr, parsed (other lines are not logs)."""
    events = []
    for line in (root / "stderr.log").read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def wait_for(predicate, seconds: float = 15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def reload_count(http: str, outcome: str) -> float:
    text = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()
    found = re.search(rf'^meshgate_config_reloads_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def denied(uri: str, user: str) -> bool:
    try:
        customers(uri, user)
    except Exception as e:  # the driver's error type varies by version
        assert "crm.customer" in str(e), e
        return True
    return False


def test_file_change_sighup_and_a_broken_config(gateway):
    root, process, uri, http = gateway
    crm = root / "domains" / "crm.toml"
    good_crm = crm.read_text()
    gateway_file = root / "meshgate.toml"
    good_gateway = gateway_file.read_text()
    alice = customers(uri, "alice")
    carol = customers(uri, "carol")
    assert 0 < alice < carol

    # The crm team withdraws the analysts' access: the file watch reloads,
    # and alice's next query no longer finds the product.
    assert REVOKE[0] in good_crm
    crm.write_text(good_crm.replace(*REVOKE))
    assert wait_for(lambda: denied(uri, "alice")), "the edit was not picked up"
    assert customers(uri, "carol") == carol
    events = log_events(root)
    assert any(e.get("message") == "config reloaded" for e in events), events
    assert reload_count(http, "ok") >= 1

    # A broken gateway file, then SIGHUP: rejected and logged; the running
    # config (alice revoked, carol served) stays.
    gateway_file.write_text(good_gateway.replace("[limits]", "[limits", 1))
    process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: reload_count(http, "rejected") >= 1)
    rejected = [e for e in log_events(root) if "rejected" in e.get("message", "")]
    assert rejected and "meshgate.toml" in rejected[-1]["error"], rejected
    assert rejected[-1]["level"] == "ERROR"
    assert denied(uri, "alice")
    assert customers(uri, "carol") == carol

    # Both files restored, SIGHUP: alice reads again.
    gateway_file.write_text(good_gateway)
    crm.write_text(good_crm)
    process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: not denied(uri, "alice"))
    assert customers(uri, "alice") == alice
    assert process.poll() is None
