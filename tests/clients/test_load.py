"""Load: 32 concurrent ADBC clients (alice, bob and carol, each with their
own policies) mix point lookups, 10-row pages, whole-product streams and
cross-domain joins against one gateway for 60 s. Every query must succeed
with the same answer each time, and the gateway's memory stays bounded.

MESHGATE_LOAD_SECONDS, MESHGATE_LOAD_CLIENTS and MESHGATE_LOAD_SCALE change
the run; MESHGATE_LOAD_REPORT names a file for the figures (JSON)."""

import json
import math
import os
import pathlib
import random
import re
import subprocess
import tempfile
import threading
import time
import urllib.request

import adbc_driver_flightsql.dbapi as flightsql

from conftest import SCALE, meshgate_binary, serve_with_http

SECONDS = float(os.environ.get("MESHGATE_LOAD_SECONDS", "60"))
CLIENTS = int(os.environ.get("MESHGATE_LOAD_CLIENTS", "32"))
LOAD_SCALE = os.environ.get("MESHGATE_LOAD_SCALE", SCALE)
MAX_RSS = 2 * 1024**3
RSS_COUNTER_SLACK = 4 * 1024**2

JOIN = (
    "SELECT n.n_name, count(*) AS orders, sum(o.o_totalprice) AS revenue "
    "FROM sales.orders o JOIN crm.customer c ON o.o_custkey = c.c_custkey "
    "JOIN crm.nation n ON c.c_nationkey = n.n_nationkey GROUP BY n.n_name"
)
STREAM = "SELECT * FROM sales.lineitem"


def peak_rss(pid: int) -> int:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


class Client(threading.Thread):
    def __init__(self, index: int, uri: str, keys, deadline: float):
        super().__init__(daemon=True)
        self.user = ["alice", "bob", "carol"][index % 3]
        self.uri = uri
        self.keys = keys
        self.deadline = deadline
        self.random = random.Random(index)
        self.latencies = {"lookup": [], "page": [], "stream": [], "join": []}
        self.answers = {}
        self.failures = []
        self.rows = 0

    def run(self):
        try:
            conn = flightsql.connect(
                self.uri, db_kwargs={"username": self.user, "password": f"{self.user}-demo"}
            )
        except Exception as e:
            self.failures.append(f"connect: {e}")
            return
        with conn, conn.cursor() as cur:
            while time.monotonic() < self.deadline:
                draw = self.random.random()
                if draw < 0.45:
                    kind = "lookup"
                    sql = f"SELECT * FROM sales.orders WHERE o_orderkey = {self.random.choice(self.keys)}"
                elif draw < 0.85:
                    kind = "page"
                    offset = self.random.randrange(0, 100)
                    sql = f"SELECT c_custkey, c_name, c_region FROM crm.customer ORDER BY c_custkey LIMIT 10 OFFSET {offset}"
                elif draw < 0.93:
                    kind, sql = "join", JOIN
                else:
                    kind, sql = "stream", STREAM
                started = time.perf_counter()
                try:
                    cur.execute(sql)
                    table = cur.fetch_arrow_table()
                except Exception as e:
                    self.failures.append(f"{kind} as {self.user}: {e}")
                    continue
                self.latencies[kind].append((time.perf_counter() - started) * 1000)
                self.rows += table.num_rows
                if kind == "lookup":
                    # Every order is visible to these three users.
                    if table.num_rows != 1:
                        self.failures.append(f"{sql}: {table.num_rows} rows")
                elif kind == "page":
                    if table.num_rows != 10:
                        self.failures.append(f"{sql} as {self.user}: {table.num_rows} rows")
                else:
                    first = self.answers.setdefault(kind, table.num_rows)
                    if first != table.num_rows:
                        self.failures.append(f"{kind} as {self.user}: {table.num_rows} rows, then {first}")


def test_32_clients_mixing_lookups_streams_and_joins():
    binary = meshgate_binary()
    with tempfile.TemporaryDirectory(prefix="meshgate-load-") as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([binary, "demo", str(root), "--scale", LOAD_SCALE], check=True, capture_output=True)
        config = root / "meshgate.toml"
        config.write_text(config.read_text().replace('output = "stdout"', 'output = "off"'))
        process, files, uri, http = serve_with_http(binary, config, root)
        try:
            with flightsql.connect(uri, db_kwargs={"username": "carol", "password": "carol-demo"}) as conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT o_orderkey FROM sales.orders ORDER BY o_orderkey LIMIT 2000")
                    keys = [row[0] for row in cur.fetchall()]

            started = time.monotonic()
            clients = [Client(i, uri, keys, started + SECONDS) for i in range(CLIENTS)]
            for client in clients:
                client.start()
            rss_samples = []
            while any(c.is_alive() for c in clients):
                rss_samples.append(int(metric(
                    urllib.request.urlopen(f"{http}/metrics", timeout=30).read().decode(),
                    "meshgate_process_resident_memory_bytes",
                )))
                time.sleep(1)
            for client in clients:
                client.join()
            elapsed = time.monotonic() - started
            text = urllib.request.urlopen(f"{http}/metrics", timeout=30).read().decode()
            peak = peak_rss(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=60)
            for file in files:
                file.close()

    failures = [f for c in clients for f in c.failures]
    latencies = {kind: [ms for c in clients for ms in c.latencies[kind]] for kind in clients[0].latencies}
    total = sum(len(v) for v in latencies.values())
    report = {
        "clients": CLIENTS,
        "seconds": round(elapsed, 1),
        "scale": float(LOAD_SCALE),
        "queries": total,
        "queries_per_second": round(total / elapsed, 1),
        "rows_per_second": round(sum(c.rows for c in clients) / elapsed),
        "failed": len(failures),
        "peak_rss_mib": round(peak / 2**20),
        "by_kind": {
            kind: {
                "count": len(values),
                "p50_ms": round(percentile(values, 50), 1),
                "p99_ms": round(percentile(values, 99), 1),
            }
            for kind, values in latencies.items()
        },
    }
    print(json.dumps(report, indent=2))
    if os.environ.get("MESHGATE_LOAD_REPORT"):
        pathlib.Path(os.environ["MESHGATE_LOAD_REPORT"]).write_text(json.dumps(report, indent=2))

    assert not failures, failures[:10]
    assert elapsed >= SECONDS
    # Each kind ran, and the gateway kept up: nothing left running after.
    assert all(len(v) > 0 for v in latencies.values()), report
    assert metric(text, "meshgate_active_queries") == 0
    assert metric(text, "meshgate_memory_reserved_bytes") == 0
    # The server saw no failed query either (the series appears with the first).
    assert math.isnan(metric(text, 'meshgate_queries_total{outcome="error"}')), text
    assert peak < MAX_RSS, report
    # The metric reads the same counters the kernel's high-water mark is kept
    # from; both are per-CPU batched (a few hundred KiB apart at most), so a
    # sample may sit a little above the mark read later.
    assert 0 < max(rss_samples) <= peak + RSS_COUNTER_SLACK, (max(rss_samples), peak)
