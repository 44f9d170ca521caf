"""The end-to-end benchmark: meshgate from a real ADBC client, beside embedded
DataFusion and DuckDB on the same Parquet files.

Measured side by side in one run, each with min/median/max over repeated runs:

1. the 22 TPC-H queries through meshgate (policies off) against embedded
   DataFusion (DataFusion's defaults, and meshgate's engine settings) and
   DuckDB; every meshgate answer is compared with DuckDB's;
2. the same 22 with a row filter and a mask on every product (policy cost),
   and embedded DataFusion with the same policies written as views;
   and the same 22 federated: the crm tables in a PostgreSQL server and the
   supply tables in a SQLite file, loaded for the run, sales on Parquet
   (every answer compared with DuckDB's, and the time with all-Parquet
   meshgate's); these run every engine side by side, query by query, round
   after round, so that load on the machine weighs on them alike;
3. streaming the whole lineitem product (6M rows at SF1) to ADBC as Arrow,
   against pyarrow reading the same Parquet file locally, in rounds;
4. small queries (point lookups and 10-row ranges): p50/p99 latency and
   queries/s with 1, 8 and 32 concurrent clients, and the latency of
   statements that read no product (what the client driver and the
   requests cost);
5. the gateway's peak memory (RSS) during each of them.

Prints a table and writes results.json and results.csv under --out.
Run through `benches/e2e/run`, which builds what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import decimal
import json
import math
import multiprocessing
import os
import pathlib
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.flight as flight
import pyarrow.parquet as pq

import memory_server

TABLES = ["lineitem", "orders", "customer", "nation", "region", "part", "partsupp", "supplier"]
DOMAINS = {
    "sales": ["lineitem", "orders"],
    "crm": ["customer", "nation", "region"],
    "supply": ["part", "partsupp", "supplier"],
}
DOMAIN_OF = {table: domain for domain, tables in DOMAINS.items() for table in tables}

# A row filter and a mask on every product. Each filter compares a column with
# an attribute of the caller, so it is a real predicate evaluated on every
# row, yet the benchmark user's attributes keep every row: answers stay
# comparable and the cost measured is the enforcement itself.
POLICIES = {
    "lineitem": ("l_shipmode <> user_attr('hidden_mode')", "l_comment", "'***'"),
    "orders": ("o_orderstatus <> user_attr('hidden_status')", "o_clerk", "'***'"),
    "customer": ("c_mktsegment <> user_attr('hidden_segment')", "c_address", "'***'"),
    "nation": ("n_name <> user_attr('hidden_nation')", "n_comment", "'***'"),
    "region": ("r_name <> user_attr('hidden_region')", "r_comment", "'***'"),
    "part": ("p_brand <> user_attr('hidden_brand')", "p_comment", "'***'"),
    "partsupp": ("ps_supplycost >= 0", "ps_comment", "'***'"),
    "supplier": (
        "s_name <> user_attr('hidden_supplier')",
        "s_phone",
        "regexp_replace(s_phone, '[0-9]', '#', 'g')",
    ),
}
BENCH_ATTRIBUTES = {
    "hidden_mode": "NONE",
    "hidden_status": "X",
    "hidden_segment": "NONE",
    "hidden_nation": "NONE",
    "hidden_region": "NONE",
    "hidden_brand": "NONE",
    "hidden_supplier": "NONE",
}
SECRET = "meshgate-benchmark-secret-0123456789abcdef"


# ---------------------------------------------------------------- setup


def generate_data(scale: float, data: pathlib.Path) -> None:
    marker = data / ".complete"
    if marker.exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    tpchgen = pathlib.Path(sys.executable).parent / "tpchgen-cli"
    print(f"generating TPC-H SF{scale} Parquet in {data}", flush=True)
    subprocess.run(
        [str(tpchgen), "parquet", "-s", str(scale), "--output-dir", str(data), "--overwrite"],
        check=True,
    )
    marker.write_text("")


def write_mesh(
    root: pathlib.Path,
    data: pathlib.Path,
    binary: str,
    policies: bool,
    federation: Federation | None = None,
) -> pathlib.Path:
    """A mesh of three domains over the TPC-H files; with `policies`, a row
    filter and a mask on every product; with a `federation`, the domains it
    holds read from its databases rather than from the files."""
    if root.exists():
        shutil.rmtree(root)
    (root / "domains").mkdir(parents=True)
    password_hash = subprocess.run(
        [binary, "hash-password"], input="bench", capture_output=True, text=True, check=True
    ).stdout.strip()
    attributes = ", ".join(f'{k} = "{v}"' for k, v in BENCH_ATTRIBUTES.items())
    (root / "meshgate.toml").write_text(
        f"""domains = ["domains/*.toml"]

[server]
flight_addr = "127.0.0.1:0"

[auth]
issuer = "meshgate"
audience = "meshgate"
hs256_secret = "{SECRET}"
token_ttl = "8h"

[[auth.users]]
name = "bench"
password_hash = "{password_hash}"
groups = ["analyst"]
attributes = {{ {attributes} }}

[limits]
query_timeout = "10m"
max_concurrent_queries = 64

[governance]
default_access = "authenticated"

[audit]
output = "{root / 'audit.log'}"
"""
    )
    for domain, tables in DOMAINS.items():
        text = [
            f'name = "{domain}"',
            f'owner = "{domain}@bench.example"',
            f'description = "TPC-H tables of the {domain} domain"',
            "",
        ]
        database = federation.storage(domain) if federation else None
        if database:
            text += ["[storage.database]", *database]
        else:
            text += ["[storage.files]", 'type = "object_store"', f'url = "file://{data}"']
        for table in tables:
            text += [
                "",
                "[[products]]",
                f'name = "{table}"',
                f'description = "TPC-H {table}"',
            ]
            if database:
                text += ['storage = "database"', f'table = "{table}"']
            else:
                text += ['storage = "files"', f'location = "{table}.parquet"', 'format = "parquet"']
        if policies:
            for table in tables:
                row_filter, column, mask = POLICIES[table]
                text += [
                    "",
                    "[[policies]]",
                    f'product = "{table}"',
                    f'row_filter = "{row_filter}"',
                    f'columns.{column} = {{ mask = "{mask}" }}',
                ]
        (root / "domains" / f"{domain}.toml").write_text("\n".join(text) + "\n")
    return root / "meshgate.toml"


class Federation:
    """The TPC-H tables of two domains in databases rather than files: `crm`
    in a PostgreSQL server started for the run, `supply` in a SQLite file,
    each table loaded from its Parquet file with the same columns and types
    (integers, NUMERIC(p, s) decimals, dates, text). `sales` stays on
    Parquet, so queries join products across the three kinds of source."""

    KINDS = {"crm": "postgres", "supply": "sqlite"}

    def __init__(self, data: pathlib.Path):
        # PostgreSQL runs as `postgres` when the harness runs as root, so
        # its directory is one every user can reach.
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="meshgate-e2e-db-"))
        self.root.chmod(0o755)
        self.as_root = os.geteuid() == 0
        self.bin = postgres_bin_dir()
        self.port = free_port()
        self.started = False
        self.sqlite = self.root / "supply.sqlite"
        try:
            print(f"loading {', '.join(f'{d} into {k}' for d, k in self.KINDS.items())}", flush=True)
            self._start_postgres()
            with contextlib.closing(sqlite3.connect(self.sqlite)) as connection:
                for domain, kind in self.KINDS.items():
                    for table in DOMAINS[domain]:
                        rows = pq.read_table(data / f"{table}.parquet")
                        if kind == "postgres":
                            self._load_postgres(table, rows)
                        else:
                            load_sqlite(connection, table, rows)
        except BaseException:
            self.stop()
            raise

    def _postgres_command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin / program), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self.as_root else command

    def _start_postgres(self) -> None:
        pgdata = self.root / "pgdata"
        if self.as_root:
            subprocess.run(["chown", "postgres:", str(self.root)], check=True)
        subprocess.run(
            self._postgres_command(
                "initdb", "-D", str(pgdata), "-U", "bench", "--auth=trust", "-E", "UTF8", "--no-sync"
            ),
            check=True,
            capture_output=True,
        )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            self._postgres_command(
                "pg_ctl", "-D", str(pgdata), "-l", str(self.root / "postgres.log"), "-w", "-o", options, "start"
            ),
            check=True,
            capture_output=True,
        )
        self.started = True

    def _load_postgres(self, table: str, rows: pa.Table) -> None:
        columns = ", ".join(f"{f.name} {sql_type(f.type)}" for f in rows.schema)
        csv_path = self.root / f"{table}.csv"
        pa_csv.write_csv(plain_strings(rows), csv_path, pa_csv.WriteOptions(include_header=False))
        psql = shutil.which("psql") or str(self.bin / "psql")
        subprocess.run(
            [
                psql, "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(self.port), "-U", "bench", "-d", "postgres",
                "-c", f"CREATE TABLE {table} ({columns})",
                "-c", f"\\copy {table} FROM '{csv_path}' WITH (FORMAT csv)",
                "-c", f"ANALYZE {table}",
            ],
            check=True,
        )
        csv_path.unlink()

    def storage(self, domain: str) -> list[str] | None:
        """The `[storage.database]` lines of `domain`, when it is held here."""
        kind = self.KINDS.get(domain)
        if kind == "postgres":
            return ['type = "postgres"', f'url = "postgres://bench@127.0.0.1:{self.port}/postgres"']
        if kind == "sqlite":
            return ['type = "sqlite"', f'path = "{self.sqlite}"']
        return None

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                self._postgres_command("pg_ctl", "-D", str(self.root / "pgdata"), "-m", "fast", "-w", "stop"),
                capture_output=True,
            )
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_bin_dir() -> pathlib.Path:
    """Where `initdb` and `pg_ctl` are: on PATH, or Debian's directory."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return pathlib.Path(found).parent
    for directory in sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (directory / "initdb").is_file():
            return directory
    raise SystemExit("the federated part needs PostgreSQL's initdb and pg_ctl (PostgreSQL 15)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sql_type(arrow_type: pa.DataType) -> str:
    """The SQL type a column of `arrow_type` is stored with (in PostgreSQL and
    SQLite alike)."""
    if pa.types.is_int64(arrow_type):
        return "BIGINT"
    if pa.types.is_integer(arrow_type):
        return "INTEGER"
    if pa.types.is_decimal(arrow_type):
        return f"NUMERIC({arrow_type.precision}, {arrow_type.scale})"
    if pa.types.is_date32(arrow_type):
        return "DATE"
    if pa.types.is_string(arrow_type) or pa.types.is_string_view(arrow_type) or pa.types.is_large_string(arrow_type):
        return "TEXT"
    raise SystemExit(f"no SQL type for {arrow_type} in the federated part")


def plain_strings(table: pa.Table) -> pa.Table:
    return table.cast(pa.schema([memory_server.plain(f) for f in table.schema]))


def load_sqlite(connection: sqlite3.Connection, table: str, rows: pa.Table) -> None:
    """Creates `table` with `rows`: decimals as SQLite keeps them (REAL under
    a NUMERIC(p, s) declaration), dates as ISO text."""
    columns = ", ".join(f"{f.name} {sql_type(f.type)}" for f in rows.schema)
    connection.execute(f"CREATE TABLE {table} ({columns})")

    def stored(value):
        if isinstance(value, decimal.Decimal):
            return float(value)
        if isinstance(value, datetime.date):
            return value.isoformat()
        return value

    values = zip(*([stored(v) for v in column.to_pylist()] for column in rows.columns))
    marks = ", ".join("?" for _ in rows.schema)
    connection.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
    connection.commit()


class Gateway:
    """A meshgate process serving one mesh, and a sampler of its memory."""

    def __init__(self, binary: str, config: pathlib.Path):
        self.log = config.parent / "stdout.log"
        out = open(self.log, "w")
        self.process = subprocess.Popen(
            [binary, "serve", "--config", str(config), "--flight-addr", "127.0.0.1:0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and self.process.poll() is None:
            line = self.log.read_text().split("\n")[0]
            if line.startswith("meshgate listening on"):
                break
            time.sleep(0.05)
        if not line.startswith("meshgate listening on"):
            self.process.kill()
            raise SystemExit(f"meshgate did not start:\n{self.log.read_text()}")
        self.uri = line.split()[3]
        self.token = subprocess.run(
            [binary, "token", "--user", "bench", "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def rss(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set() and self.process.poll() is None:
            try:
                self.peak = max(self.peak, self.rss())
            except OSError:
                return
            time.sleep(0.01)

    def reset_peak(self) -> None:
        self.peak = self.rss()

    def cpu_seconds(self) -> float:
        """User and system CPU time the gateway has used so far."""
        return process_cpu_seconds(self.process.pid)

    def connect(self):
        return flightsql.connect(
            self.uri,
            db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {self.token}"},
            autocommit=True,
        )

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ---------------------------------------------------------------- queries


def load_queries(directory: pathlib.Path, only: list[str] | None) -> dict[str, str]:
    names = only or [f"q{n}" for n in range(1, 23)]
    return {name: (directory / f"{name}.sql").read_text() for name in names}


_TABLE_REF = re.compile(
    r"(?P<lead>\b(?:from|join)\s+|,\s*)(?P<table>" + "|".join(TABLES) + r")\b(?!\s*\()",
    re.IGNORECASE,
)


def qualify(sql: str) -> str:
    """TPC-H names tables bare; in the mesh they are `domain.table`. Only
    names in table position (after FROM, JOIN or a comma) are rewritten:
    `n_name as nation` stays."""

    def replace(match: re.Match) -> str:
        table = match.group("table").lower()
        return f"{match.group('lead')}{DOMAIN_OF[table]}.{table}"

    return _TABLE_REF.sub(replace, sql)


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1]}


class DataFusionRunner:
    """Embedded DataFusion (benches/tpch.rs in --serve mode): one process,
    kept up for the whole run, that runs a query each time it is asked."""

    def __init__(self, runner: list[str], data: pathlib.Path, queries_dir: pathlib.Path,
                 settings: str, setup: pathlib.Path | None = None):
        command = runner + [
            "--data", str(data), "--queries", str(queries_dir), "--settings", settings, "--serve",
        ]
        if setup:
            command += ["--setup", str(setup)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, name: str) -> tuple[float, int, None]:
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"embedded DataFusion stopped (exit {self.process.wait()}) running {name}")
        answer = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"embedded DataFusion, {name}: {answer['error']}")
        return answer["ms"], answer["rows"], None

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def timed(execute, texts: dict[str, str]):
    """A subject that runs query `name` as `execute(texts[name])`, timed here."""

    def run(name: str) -> tuple[float, int, pa.Table]:
        start = time.perf_counter()
        answer = execute(texts[name])
        return (time.perf_counter() - start) * 1000, answer.num_rows, answer

    return run


def duckdb_subject(data: pathlib.Path, queries: dict[str, str]):
    connection = duckdb.connect()
    for table in TABLES:
        connection.execute(
            f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{data / (table + '.parquet')}')"
        )
    return timed(lambda sql: connection.sql(sql).to_arrow_table(), queries)


def meshgate_subject(gateway: Gateway, queries: dict[str, str], closers: list):
    """meshgate through one ADBC connection; closing it is left in `closers`."""
    connection = gateway.connect()
    cursor = connection.cursor()
    closers.extend([cursor.close, connection.close])

    def execute(sql: str) -> pa.Table:
        cursor.execute(sql)
        return cursor.fetch_arrow_table()

    return timed(execute, {name: qualify(sql) for name, sql in queries.items()})


def run_interleaved(subjects: dict, names: list[str], runs: int) -> dict:
    """Runs every query on every subject side by side: one warm-up round,
    then `runs` rounds, each running query after query and, for each query,
    every subject one after the other (in an order that rotates from round
    to round). Load on the machine that comes and goes then weighs on every
    subject alike, and each ratio compares times taken seconds apart.
    Returns per subject and query the times in ms, the row count and the
    last answer (None for embedded DataFusion, whose answers stay in its
    process)."""
    results = {subject: {} for subject in subjects}
    order = list(subjects)
    for round_ in range(runs + 1):
        print("  warm-up round" if round_ == 0 else f"  round {round_} of {runs}", flush=True)
        shift = round_ % len(order)
        for name in names:
            for subject in order[shift:] + order[:shift]:
                ms, rows, answer = subjects[subject](name)
                entry = results[subject].setdefault(name, {"times_ms": []})
                entry["rows"], entry["answer"] = rows, answer
                if round_ > 0:
                    entry["times_ms"].append(ms)
    width = max(len(subject) for subject in order)
    for name in names:
        for subject in order:
            s = summary(results[subject][name]["times_ms"])
            print(
                f"  {subject:<{width}} {name:>4}  median {s['median']:9.1f} ms"
                f"  min {s['min']:9.1f}  max {s['max']:9.1f}  rows {results[subject][name]['rows']}",
                flush=True,
            )
    return results


def policy_views(data: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """SQL that registers each table under a raw name and a view with the
    benchmark's row filter and mask written by hand, the caller's attributes
    as literals: the same policies, for the engine alone."""
    statements = []
    for table in TABLES:
        path = data / f"{table}.parquet"
        row_filter, masked, mask = POLICIES[table]
        for name, value in BENCH_ATTRIBUTES.items():
            row_filter = row_filter.replace(f"user_attr('{name}')", f"'{value}'")
        columns = [
            f"{mask} AS {column}" if column == masked else column
            for column in pq.read_schema(path).names
        ]
        statements.append(f"CREATE EXTERNAL TABLE raw_{table} STORED AS PARQUET LOCATION '{path}'")
        statements.append(
            f"CREATE VIEW {table} AS SELECT {', '.join(columns)} FROM raw_{table} WHERE {row_filter}"
        )
    setup = out / "policy-views.sql"
    setup.write_text("\n".join(statements) + "\n")
    return setup


# ---------------------------------------------------------------- answers


def normal_value(value):
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, str):
        return value.rstrip()
    return value


def same_value(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        # Averages and ratios differ in the last digits between engines
        # (DataFusion keeps 6 decimal places of a decimal average, DuckDB a
        # double); TPC-H itself allows rounding to 1/100.
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-5)
    return a == b


def rows_of(table: pa.Table) -> list[tuple]:
    return [tuple(normal_value(v) for v in row.values()) for row in table.to_pylist()]


def first_difference(want: list[tuple], got: list[tuple]) -> str | None:
    for i, (w, g) in enumerate(zip(want, got)):
        if len(w) != len(g) or not all(same_value(a, b) for a, b in zip(w, g)):
            return f"row {i} differs: {g} vs DuckDB {w}"
    return None


def compare_answers(expected: pa.Table, actual: pa.Table) -> str | None:
    """None when `actual` has DuckDB's rows, in DuckDB's order or, where
    ORDER BY leaves ties, in another order."""
    if expected.num_columns != actual.num_columns:
        return f"{actual.num_columns} columns, DuckDB has {expected.num_columns}"
    if expected.num_rows != actual.num_rows:
        return f"{actual.num_rows} rows, DuckDB has {expected.num_rows}"
    want, got = rows_of(expected), rows_of(actual)
    problem = first_difference(want, got)
    if problem is None:
        return None

    def key(row):
        return tuple((round(v, 4) if isinstance(v, float) else v) for v in row)

    if first_difference(sorted(want, key=key), sorted(got, key=key)) is None:
        return None
    return problem


# ---------------------------------------------------------------- streaming


STREAM_SUBJECTS = ("pyarrow_local", "meshgate_adbc", "meshgate_pyarrow_flight", "memory_server_adbc")


def run_stream(gateway: Gateway, data: pathlib.Path, runs: int) -> dict:
    """Streams the whole lineitem product, in rounds: each round reads the
    file locally with pyarrow, then streams it from meshgate to ADBC and to
    pyarrow's Flight client, then from a server holding the rows in memory
    to ADBC, each twice (the first read warms up, the second is timed).
    Each stream's rate is compared with the local read of its own round,
    seconds apart, so that a slow spell of the machine weighs on both."""
    path = data / "lineitem.parquet"
    connection = gateway.connect()
    cursor = connection.cursor()
    flight_client = flight.FlightClient(gateway.uri)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {gateway.token}".encode())])
    memory = MemoryServer(path)

    # Each sample: seconds, rows, bytes, the server's CPU seconds and this
    # process's (the client's) CPU seconds.
    def timed(read, server_cpu) -> tuple:
        start, client_cpu, server_start = time.perf_counter(), time.process_time(), server_cpu()
        rows, size = read()
        return (
            time.perf_counter() - start,
            rows,
            size,
            server_cpu() - server_start,
            time.process_time() - client_cpu,
        )

    def local():
        table = pq.read_table(path)
        return table.num_rows, table.nbytes

    def adbc(cursor):
        def read():
            cursor.execute("SELECT * FROM sales.lineitem")
            rows = size = 0
            for batch in cursor.fetch_record_batch():
                rows += batch.num_rows
                size += batch.nbytes
            return rows, size

        return read

    # The same stream read by pyarrow's C++ Flight client: what the server
    # sends when the client is not the bottleneck.
    def native():
        descriptor = flight.FlightDescriptor.for_command(statement_query("SELECT * FROM sales.lineitem"))
        info = flight_client.get_flight_info(descriptor, options)
        rows = size = 0
        for endpoint in info.endpoints:
            for chunk in flight_client.do_get(endpoint.ticket, options):
                rows += chunk.data.num_rows
                size += chunk.data.nbytes
        return rows, size

    samples = {subject: [] for subject in STREAM_SUBJECTS}
    try:
        # The same rows to the same ADBC client from a server that holds
        # them in memory as the wire sends them: what the client takes when
        # the server costs next to nothing.
        memory_cursor = memory.connect().cursor()
        reads = {
            "pyarrow_local": (local, lambda: 0.0),
            "meshgate_adbc": (adbc(cursor), gateway.cpu_seconds),
            "meshgate_pyarrow_flight": (native, gateway.cpu_seconds),
            "memory_server_adbc": (adbc(memory_cursor), memory.cpu_seconds),
        }
        gateway.reset_peak()
        for _ in range(runs):
            for subject, (read, server_cpu) in reads.items():
                # Each timed read follows one of its own: a read right after
                # another subject's would first pay for the memory that one
                # left (in this VM, a cold gigabyte costs a local read four
                # times its CPU), which no repeated read of a client pays.
                read()
                samples[subject].append(timed(read, server_cpu))
        peak = gateway.peak
        memory_cursor.close()
    finally:
        memory.stop()
        cursor.close()
        connection.close()
        flight_client.close()

    def rates(subject: str) -> dict:
        own, local_samples = samples[subject], samples["pyarrow_local"]
        result = {
            "seconds": summary([s[0] for s in own]),
            "rows": own[0][1],
            "rows_per_s": summary([s[1] / s[0] for s in own]),
            "bytes_per_s": summary([s[2] / s[0] for s in own]),
            "server_cpu_s": summary([s[3] for s in own]),
            "client_cpu_s": summary([s[4] for s in own]),
        }
        if subject != "pyarrow_local":
            # Rows/s against the local read of the same round.
            result["of_local"] = summary([(s[1] / s[0]) / (l[1] / l[0]) for s, l in zip(own, local_samples)])
            # The rate the stream's CPU time would allow if the server and
            # the client together kept every core busy, against the local
            # read's: what the machine's cores allow at best.
            cores = os.cpu_count() or 1
            result["cpu_bound_of_local"] = summary(
                [
                    (s[1] * cores / (s[3] + s[4])) / (l[1] / l[0])
                    for s, l in zip(own, local_samples)
                ]
            )
        return result

    result = {subject: rates(subject) for subject in STREAM_SUBJECTS}
    result["peak_rss"] = peak
    for subject in STREAM_SUBJECTS:
        r = result[subject]
        of_local = f"  {r['of_local']['median']:.0%} of local" if "of_local" in r else ""
        print(
            f"  stream {subject:<23} {r['rows']} rows  median {r['seconds']['median']:.2f} s"
            f"  {r['rows_per_s']['median'] / 1e6:.2f} M rows/s"
            f"  {r['bytes_per_s']['median'] / 1e6:.0f} MB/s{of_local}"
            f"  CPU s: server {r['server_cpu_s']['median']:.2f}, client {r['client_cpu_s']['median']:.2f}",
            flush=True,
        )
    return result


def stream_peak(gateway: Gateway) -> int:
    """The gateway's peak RSS over one stream of the whole lineitem product
    to ADBC, counted from the RSS it holds when the stream starts: on the
    gateway that ran the TPC-H rounds, what a gateway in service reaches."""
    connection = gateway.connect()
    cursor = connection.cursor()
    try:
        gateway.reset_peak()
        cursor.execute("SELECT * FROM sales.lineitem")
        for _ in cursor.fetch_record_batch():
            pass
        return gateway.peak
    finally:
        cursor.close()
        connection.close()


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name, which is in parentheses.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemoryServer:
    """`memory_server.py` serving the rows of one Parquet file from memory,
    in a process of its own."""

    def __init__(self, path: pathlib.Path):
        script = pathlib.Path(__file__).with_name("memory_server.py")
        self.process = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != "port":
            self.stop()
            raise RuntimeError(f"the memory server did not start: {line}")
        self.uri = f"grpc://127.0.0.1:{line[1]}"

    def connect(self):
        self.connection = flightsql.connect(self.uri, autocommit=True)
        return self.connection

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if getattr(self, "connection", None) is not None:
            self.connection.close()
        self.process.terminate()
        self.process.wait(30)


def statement_query(sql: str) -> bytes:
    """A Flight SQL CommandStatementQuery in a protobuf Any, encoded by hand
    (field 1 of each message, length-delimited)."""

    def field(number: int, payload: bytes) -> bytes:
        length, varint = len(payload), bytearray()
        while True:
            byte = length & 0x7F
            length >>= 7
            varint.append(byte | (0x80 if length else 0))
            if not length:
                break
        return bytes([number << 3 | 2]) + bytes(varint) + payload

    command = field(1, sql.encode())
    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    return field(1, type_url) + field(2, command)


# ---------------------------------------------------------------- latency


def _small_query(rng: random.Random, orders: int, customers: int) -> tuple[str, str]:
    """A point lookup of a whole order row, or a 10-row range of customers."""
    if rng.random() < 0.5:
        # TPC-H order keys: 8 of every 32 integers are used.
        n = rng.randrange(orders)
        key = (n // 8) * 32 + n % 8 + 1
        return "point", f"SELECT * FROM sales.orders WHERE o_orderkey = {key}"
    key = rng.randrange(1, customers - 10)
    return "range", (
        "SELECT c_custkey, c_name, c_nationkey, c_acctbal FROM crm.customer "
        f"WHERE c_custkey BETWEEN {key} AND {key + 9}"
    )


def _constant_query(rng: random.Random, orders: int, customers: int) -> tuple[str, str]:
    """A statement that reads no product, its text new each time: what a
    query costs the client driver and its requests, planning included."""
    return "constant", f"SELECT {rng.randrange(10**9)} AS n"


def _latency_client(args) -> tuple[list[tuple[str, float]], int, int]:
    uri, token, seconds, seed, orders, customers, start_at, query = args
    connection = flightsql.connect(
        uri, db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {token}"}, autocommit=True
    )
    cursor = connection.cursor()
    rng = random.Random(seed)
    # One warm-up query, then wait for every client to be connected.
    cursor.execute(query(rng, orders, customers)[1])
    cursor.fetch_arrow_table()
    while time.time() < start_at:
        time.sleep(0.001)
    latencies, errors, rows = [], 0, 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        kind, sql = query(rng, orders, customers)
        start = time.perf_counter()
        try:
            cursor.execute(sql)
            rows += cursor.fetch_arrow_table().num_rows
        except Exception:  # noqa: BLE001 - counted, reported as errors
            errors += 1
            continue
        latencies.append((kind, (time.perf_counter() - start) * 1000))
    cursor.close()
    connection.close()
    return latencies, errors, rows


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def p50_p99(values: list[float]) -> dict:
    """The median and 99th percentile of `values`, in ms; None when empty."""
    return {
        "p50_ms": percentile(values, 50) if values else None,
        "p99_ms": percentile(values, 99) if values else None,
    }


def run_latency_duckdb(data: pathlib.Path, scale: float, seconds: float) -> dict:
    """The same small queries, one after another, in DuckDB embedded in this
    process and reading the same files: what a lookup costs the peer with
    no network, no client driver and no gateway between."""
    connection = duckdb.connect()
    for domain, tables in DOMAINS.items():
        connection.execute(f"CREATE SCHEMA {domain}")
        for table in tables:
            connection.execute(
                f"CREATE VIEW {domain}.{table} AS "
                f"SELECT * FROM read_parquet('{data / (table + '.parquet')}')"
            )
    rng = random.Random(1000)
    orders, customers = int(1_500_000 * scale), int(150_000 * scale)
    connection.sql(_small_query(rng, orders, customers)[1]).to_arrow_table()
    timed = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        kind, sql = _small_query(rng, orders, customers)
        start = time.perf_counter()
        connection.sql(sql).to_arrow_table()
        timed.append((kind, (time.perf_counter() - start) * 1000))
    connection.close()
    latencies = [ms for _, ms in timed]
    result = {
        "queries": len(timed),
        **p50_p99(latencies),
        "by_kind": {
            kind: p50_p99(values)
            for kind in ("point", "range")
            if (values := [ms for k, ms in timed if k == kind])
        },
    }
    print(
        f"  small queries, DuckDB in-process: p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
        + "  ".join(
            f"{kind} p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f}" for kind, v in result["by_kind"].items()
        ),
        flush=True,
    )
    return result


def run_latency(
    gateway: Gateway,
    scale: float,
    seconds: float,
    clients_list: list[int],
    query=_small_query,
    what: str = "small queries",
) -> dict:
    """For each number of clients, that many processes each sending
    statements made by `query` one after another for `seconds`."""
    orders = int(1_500_000 * scale)
    customers = int(150_000 * scale)
    results = {}
    context = multiprocessing.get_context("spawn")
    for clients in clients_list:
        gateway.reset_peak()
        start_at = time.time() + 3 + clients * 0.1
        jobs = [
            (gateway.uri, gateway.token, seconds, 1000 * clients + i, orders, customers, start_at, query)
            for i in range(clients)
        ]
        server_cpu = gateway.cpu_seconds()
        with context.Pool(clients) as pool:
            outcomes = pool.map(_latency_client, jobs)
        server_cpu = gateway.cpu_seconds() - server_cpu
        timed = [sample for outcome in outcomes for sample in outcome[0]]
        latencies = [ms for _, ms in timed]
        by_kind = {
            kind: [ms for k, ms in timed if k == kind] for kind in ("point", "range")
        }
        errors = sum(outcome[1] for outcome in outcomes)
        rows = sum(outcome[2] for outcome in outcomes)
        result = {
            "clients": clients,
            "queries": len(latencies),
            "errors": errors,
            "rows": rows,
            "qps": len(latencies) / seconds,
            **p50_p99(latencies),
            "by_kind": {
                kind: p50_p99(values)
                for kind, values in by_kind.items()
                if values
            },
            "peak_rss": gateway.peak,
            # Every query's share, each client's warm-up query included.
            "server_cpu_ms_per_query": 1000 * server_cpu / (len(timed) + errors + clients),
        }
        results[str(clients)] = result
        print(
            f"  {what}, {clients:>2} clients: {result['qps']:7.1f} q/s"
            f"  p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms"
            f"  errors {errors}  server CPU {result['server_cpu_ms_per_query']:.2f} ms/query  "
            + "  ".join(
                f"{kind} p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f}"
                for kind, v in result["by_kind"].items()
            ),
            flush=True,
        )
    return results


# ---------------------------------------------------------------- report


def run_totals(results: dict, names: list[str]) -> list[float]:
    """Each run's total: run i of every query, summed."""
    runs = len(results[names[0]]["times_ms"])
    return [sum(results[name]["times_ms"][i] for name in names) for i in range(runs)]


def engine_ratios(tpch: dict, a: str, b: str) -> dict:
    """Engine `a`'s time over engine `b`'s. Rounds run every engine query by
    query, so run i of both is paired: min/median/max over the runs of the
    ratio of their totals, and the ratio of the sums of each query's median
    (which a spike in one query of one run moves least)."""
    per_run = [x / y for x, y in zip(tpch[a]["run_totals_ms"], tpch[b]["run_totals_ms"])]
    return {
        **summary(per_run),
        "of_query_medians": tpch[a]["sum_of_query_medians_ms"] / tpch[b]["sum_of_query_medians_ms"],
    }


RATIOS = [
    ("meshgate / datafusion_default", "meshgate", "datafusion_default"),
    ("meshgate / datafusion_meshgate", "meshgate", "datafusion_meshgate"),
    ("meshgate / duckdb", "meshgate", "duckdb"),
    ("policies on / off", "meshgate_policies", "meshgate"),
    ("same policies as views in DataFusion alone: on / off", "datafusion_policy_views", "datafusion_meshgate"),
    ("federated / files", "meshgate_federated", "meshgate"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=pathlib.Path, help="TPC-H Parquet directory (generated if missing)")
    parser.add_argument("--queries", type=pathlib.Path, required=True)
    parser.add_argument("--meshgate", required=True, help="the meshgate binary")
    parser.add_argument("--datafusion", required=True, help="command running benches/tpch.rs")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--only", help="comma-separated queries, e.g. q1,q6")
    parser.add_argument("--parts", default="tpch,policy,federated,stream,latency")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args()

    parts = set(args.parts.split(","))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    scale_label = f"{args.scale:g}"
    data = (args.data or (out / f"tpch-sf{scale_label}")).resolve()
    generate_data(args.scale, data)
    queries = load_queries(args.queries, args.only.split(",") if args.only else None)
    names = list(queries)
    runner_command = args.datafusion.split()

    report: dict = {
        "scale": args.scale,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"duckdb": duckdb.__version__, "pyarrow": pa.__version__},
    }
    rows_csv = []

    if parts & {"tpch", "policy", "federated", "stream"}:
        open_mesh = write_mesh(out / "mesh-open", data, args.meshgate, policies=False)
    if parts & {"policy", "latency"}:
        governed_mesh = write_mesh(out / "mesh-governed", data, args.meshgate, policies=True)

    tpch = {}
    after_tpch_peak = None
    if parts & {"tpch", "policy", "federated"}:
        print(
            f"TPC-H SF{scale_label}, {len(names)} queries, {args.runs} runs each after a warm-up,"
            " every engine side by side query by query",
            flush=True,
        )
        gateways: dict[str, Gateway] = {}
        runners: list[DataFusionRunner] = []
        closers: list = []
        subjects = {}
        federation = None
        try:
            gateways["meshgate"] = Gateway(args.meshgate, open_mesh)
            subjects["meshgate"] = meshgate_subject(gateways["meshgate"], queries, closers)
            if "policy" in parts:
                gateways["meshgate_policies"] = Gateway(args.meshgate, governed_mesh)
                subjects["meshgate_policies"] = meshgate_subject(
                    gateways["meshgate_policies"], queries, closers
                )
                runner = DataFusionRunner(runner_command, data, args.queries, "meshgate", policy_views(data, out))
                runners.append(runner)
                subjects["datafusion_policy_views"] = runner.run
            if "tpch" in parts:
                for settings in ("default", "meshgate"):
                    runner = DataFusionRunner(runner_command, data, args.queries, settings)
                    runners.append(runner)
                    subjects[f"datafusion_{settings}"] = runner.run
                subjects["duckdb"] = duckdb_subject(data, queries)
            if "federated" in parts:
                federation = Federation(data)
                federated_mesh = write_mesh(
                    out / "mesh-federated", data, args.meshgate, policies=False, federation=federation
                )
                gateways["meshgate_federated"] = Gateway(args.meshgate, federated_mesh)
                subjects["meshgate_federated"] = meshgate_subject(gateways["meshgate_federated"], queries, closers)
                if "duckdb" not in subjects:
                    subjects["duckdb"] = duckdb_subject(data, queries)
            for gateway in gateways.values():
                gateway.reset_peak()
            tpch = run_interleaved(subjects, names, args.runs)
            for subject, gateway in gateways.items():
                tpch[subject]["_peak_rss"] = gateway.peak
            if "stream" in parts:
                after_tpch_peak = stream_peak(gateways["meshgate"])
        finally:
            for close in closers:
                close()
            for gateway in gateways.values():
                gateway.stop()
            for runner in runners:
                runner.stop()
            if federation:
                federation.stop()
    # Every engine answers each query with as many rows as meshgate without
    # policies (the benchmark's filters keep every row).
    for subject, results in tpch.items():
        for name in names:
            if results[name]["rows"] != tpch["meshgate"][name]["rows"]:
                raise SystemExit(
                    f"{name}: {subject} answered {results[name]['rows']} rows,"
                    f" meshgate {tpch['meshgate'][name]['rows']}"
                )
    # meshgate's answers, from the files and federated, against DuckDB's.
    for subject, key, mismatches_key in (
        ("meshgate", "answers_match_duckdb", "answer_mismatches"),
        ("meshgate_federated", "federated_answers_match_duckdb", "federated_answer_mismatches"),
    ):
        if subject not in tpch or "duckdb" not in tpch:
            continue
        mismatches = {}
        for name in names:
            problem = compare_answers(tpch["duckdb"][name]["answer"], tpch[subject][name]["answer"])
            if problem:
                mismatches[name] = problem
        report[key] = not mismatches
        report[mismatches_key] = mismatches
        for name, problem in mismatches.items():
            print(f"  ANSWER MISMATCH {subject} {name}: {problem}", flush=True)

    if tpch:
        engines = list(tpch)
        report["tpch"] = {
            engine: {
                "total_ms": summary(run_totals(tpch[engine], names)),
                "run_totals_ms": run_totals(tpch[engine], names),
                "sum_of_query_medians_ms": sum(
                    statistics.median(tpch[engine][name]["times_ms"]) for name in names
                ),
                "peak_rss": tpch[engine].get("_peak_rss"),
                "queries": {
                    name: {"times_ms": tpch[engine][name]["times_ms"], "rows": tpch[engine][name]["rows"]}
                    for name in names
                },
            }
            for engine in engines
        }
        for engine in engines:
            for name in names:
                s = summary(tpch[engine][name]["times_ms"])
                rows_csv.append(["tpch", engine, name, s["min"], s["median"], s["max"], "ms"])
            t = report["tpch"][engine]["total_ms"]
            rows_csv.append(["tpch", engine, "total", t["min"], t["median"], t["max"], "ms"])
        report["tpch_ratios"] = {
            label: engine_ratios(report["tpch"], a, b)
            for label, a, b in RATIOS
            if a in report["tpch"] and b in report["tpch"]
        }
        for label, r in report["tpch_ratios"].items():
            rows_csv.append(["tpch", label, "ratio of run totals", r["min"], r["median"], r["max"], "x"])
            rows_csv.append(["tpch", label, "ratio of query medians", "", r["of_query_medians"], "", "x"])

    if "stream" in parts:
        gateway = Gateway(args.meshgate, open_mesh)
        try:
            report["stream"] = run_stream(gateway, data, args.runs)
        finally:
            gateway.stop()
        if after_tpch_peak is not None:
            report["stream"]["peak_rss_after_tpch"] = after_tpch_peak
        for key in STREAM_SUBJECTS:
            for measure, unit in (
                ("rows_per_s", "rows/s"),
                ("of_local", "x"),
                ("cpu_bound_of_local", "x"),
                ("server_cpu_s", "s"),
                ("client_cpu_s", "s"),
            ):
                r = report["stream"][key].get(measure)
                if r is not None:
                    rows_csv.append(["stream", key, measure, r["min"], r["median"], r["max"], unit])

    if "latency" in parts:
        gateway = Gateway(args.meshgate, governed_mesh)
        try:
            clients = [int(c) for c in args.clients.split(",")]
            report["latency"] = run_latency(gateway, args.scale, args.latency_seconds, clients)
            # What any statement costs the client driver and its requests.
            report["latency_floor"] = run_latency(
                gateway, args.scale, args.latency_seconds, [1], _constant_query, "statements reading no product"
            )["1"]
        finally:
            gateway.stop()
        report["latency_duckdb"] = run_latency_duckdb(data, args.scale, args.latency_seconds)
        for subject, key in (("duckdb in-process", "latency_duckdb"), ("reading no product", "latency_floor")):
            for measure in ("p50", "p99"):
                rows_csv.append(["latency", subject, measure, "", report[key][f"{measure}_ms"], "", "ms"])
        for clients, r in report["latency"].items():
            rows_csv.append(["latency", f"{clients} clients", "p50", "", r["p50_ms"], "", "ms"])
            rows_csv.append(["latency", f"{clients} clients", "p99", "", r["p99_ms"], "", "ms"])
            rows_csv.append(["latency", f"{clients} clients", "qps", "", r["qps"], "", "q/s"])
            rows_csv.append(
                ["latency", f"{clients} clients", "server_cpu_per_query", "", r["server_cpu_ms_per_query"], "", "ms"]
            )

    print_report(report)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["part", "subject", "measure", "min", "median", "max", "unit"])
        writer.writerows(rows_csv)
    print(f"\nresults: {out / 'results.json'}, {out / 'results.csv'}")


def print_report(report: dict) -> None:
    print("\n== meshgate end-to-end benchmark ==")
    tpch = report.get("tpch")
    if tpch:
        print(f"TPC-H SF{report['scale']:g} total time (ms, min / median / max of {report['runs']} runs):")
        for engine, r in tpch.items():
            t = r["total_ms"]
            peak = f"  peak RSS {r['peak_rss'] / 2**20:.0f} MiB" if r.get("peak_rss") else ""
            print(f"  {engine:<24} {t['min']:9.0f} {t['median']:9.0f} {t['max']:9.0f}{peak}")
        print("Ratios: median of the runs' (min-max), and of the sums of each query's median:")
        for label, r in report.get("tpch_ratios", {}).items():
            print(
                f"  {label:<32} {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}), "
                f"query medians {r['of_query_medians']:.2f}x"
            )
        if "answers_match_duckdb" in report:
            print(f"  answers match DuckDB: {report['answers_match_duckdb']}")
        if "federated_answers_match_duckdb" in report:
            print(
                "  federated (crm in PostgreSQL, supply in SQLite, sales on Parquet) answers match DuckDB:"
                f" {report['federated_answers_match_duckdb']}"
            )
    stream = report.get("stream")
    if stream:
        local = stream["pyarrow_local"]

        def of_local(r: dict) -> str:
            ratio = r["of_local"]
            return f"{ratio['median']:.0%} of the local read ({ratio['min']:.0%}-{ratio['max']:.0%})"

        remote = stream["meshgate_adbc"]
        print(
            f"stream {remote['rows']} rows, rows/s against pyarrow's local read of the same round"
            f" ({local['rows_per_s']['median'] / 1e6:.2f} M rows/s, median of {report['runs']} rounds):"
        )
        print(
            f"  meshgate -> ADBC {remote['rows_per_s']['median'] / 1e6:.2f} M rows/s, {of_local(remote)},"
            f" peak RSS {stream['peak_rss'] / 2**20:.0f} MiB"
            + (
                f" ({stream['peak_rss_after_tpch'] / 2**20:.0f} MiB on the gateway that ran the TPC-H rounds)"
                if "peak_rss_after_tpch" in stream
                else ""
            )
        )
        native = stream["meshgate_pyarrow_flight"]
        print(
            f"  meshgate -> pyarrow's Flight client {native['rows_per_s']['median'] / 1e6:.2f} M rows/s,"
            f" {of_local(native)}"
        )
        memory = stream["memory_server_adbc"]
        print(
            f"  a server holding the rows in memory -> ADBC {memory['rows_per_s']['median'] / 1e6:.2f} M rows/s,"
            f" {of_local(memory)}; its CPU {memory['server_cpu_s']['median']:.2f} s,"
            f" the client's {memory['client_cpu_s']['median']:.2f} s"
        )
        print(
            f"  CPU seconds per stream (median): gateway {remote['server_cpu_s']['median']:.2f},"
            f" ADBC client {remote['client_cpu_s']['median']:.2f};"
            f" pyarrow's local read {local['client_cpu_s']['median']:.2f}."
            f" With every core busy, that CPU time allows"
            f" {remote['cpu_bound_of_local']['median']:.0%} of the local read"
        )
    latency = report.get("latency")
    if latency:
        for clients, r in latency.items():
            print(
                f"small queries, {clients:>2} clients: {r['qps']:.0f} q/s, p50 {r['p50_ms']:.2f} ms,"
                f" p99 {r['p99_ms']:.2f} ms, errors {r['errors']}, peak RSS {r['peak_rss'] / 2**20:.0f} MiB,"
                f" gateway CPU {r['server_cpu_ms_per_query']:.2f} ms/query"
            )
            for kind, v in r["by_kind"].items():
                print(f"    {kind:<5} p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms")
    floor = report.get("latency_floor")
    if floor:
        print(
            f"statements reading no product (SELECT <n>), 1 client: p50 {floor['p50_ms']:.2f} ms,"
            f" p99 {floor['p99_ms']:.2f} ms, gateway CPU {floor['server_cpu_ms_per_query']:.2f} ms/query"
        )
    duck = report.get("latency_duckdb")
    if duck:
        print(
            f"small queries, DuckDB in-process on the same files (reference): p50 {duck['p50_ms']:.2f} ms,"
            f" p99 {duck['p99_ms']:.2f} ms"
        )
        for kind, v in duck["by_kind"].items():
            print(f"    {kind:<5} p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
