"""The Python ADBC driver against the demo mesh: login, a cross-domain join
checked against the files, metadata, parameters and errors."""

import decimal

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

JOIN = """
SELECT n.n_name, count(*) AS orders
FROM sales.orders o
JOIN crm.customer c ON o.o_custkey = c.c_custkey
JOIN crm.nation n ON c.c_nationkey = n.n_nationkey
GROUP BY n.n_name
ORDER BY 2 DESC, 1
"""


def connect(server, user="alice", password=None):
    return flight_sql.connect(
        server.uri,
        db_kwargs={"username": user, "password": password or f"{user}-demo"},
        autocommit=True,
    )


def expected_join(data):
    orders = pq.read_table(data / "sales" / "orders", columns=["o_custkey"])
    customers = pq.read_table(data / "crm" / "customer.parquet", columns=["c_custkey", "c_nationkey"])
    nations = pa.csv.read_csv(data / "crm" / "nation.csv").select(["n_nationkey", "n_name"])
    joined = orders.join(customers, "o_custkey", "c_custkey").join(nations, "c_nationkey", "n_nationkey")
    counts = joined.group_by("n_name").aggregate([("n_name", "count")]).to_pylist()
    return sorted(((r["n_name"], r["n_name_count"]) for r in counts), key=lambda r: (-r[1], r[0]))


def test_cross_domain_join_matches_the_files(demo_server):
    # carol (crm) sees every customer.
    with connect(demo_server, "carol") as conn, conn.cursor() as cur:
        cur.execute(JOIN)
        rows = cur.fetchall()
    assert len(rows) == 25
    assert rows == expected_join(demo_server.data)


def test_policies_shape_what_each_user_sees(demo_server):
    sql = "SELECT c_region, count(*) FROM crm.customer GROUP BY c_region ORDER BY 1"
    with connect(demo_server, "alice") as conn, conn.cursor() as cur:
        cur.execute(sql)
        assert [r[0] for r in cur.fetchall()] == ["EUROPE"]
        cur.execute("SELECT c_phone FROM crm.customer LIMIT 1")
        assert cur.fetchall() == [("***",)]
        cur.execute("SELECT * FROM crm.customer LIMIT 1")
        assert "c_acctbal" not in [d[0] for d in cur.description]
    with connect(demo_server, "bob") as conn, conn.cursor() as cur:
        cur.execute(sql)
        assert [r[0] for r in cur.fetchall()] == ["AMERICA"]
        cur.execute("SELECT c_phone FROM crm.customer LIMIT 1")
        assert cur.fetchall()[0][0] != "***"
    with connect(demo_server, "carol") as conn, conn.cursor() as cur:
        cur.execute(sql)
        assert len(cur.fetchall()) == 5
        cur.execute("SELECT c_acctbal FROM crm.customer LIMIT 1")
        assert isinstance(cur.fetchall()[0][0], decimal.Decimal)
        with pytest.raises(adbc_driver_manager.ProgrammingError, match="table 'mesh.supply.part' not found"):
            cur.execute("SELECT * FROM supply.part")
    with connect(demo_server, "dave") as conn:
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        tables = {
            (s["db_schema_name"], t["table_name"])
            for c in objects
            for s in c["catalog_db_schemas"]
            for t in s["db_schema_tables"]
        }
        assert ("supply", "part") in tables
        assert ("crm", "customer") not in tables and ("sales", "orders") not in tables


def test_arrow_results_have_plain_types(demo_server):
    with connect(demo_server) as conn, conn.cursor() as cur:
        cur.execute("SELECT o_orderkey, o_orderstatus, o_totalprice, o_orderdate FROM sales.orders ORDER BY o_orderkey LIMIT 3")
        table = cur.fetch_arrow_table()
    assert table.schema.field("o_orderstatus").type == pa.string()
    assert table.schema.field("o_totalprice").type == pa.decimal128(15, 2)
    assert table.schema.field("o_orderdate").type == pa.date32()
    assert table.column("o_orderkey").to_pylist() == [1, 2, 3]
    assert all(isinstance(v, decimal.Decimal) for v in table.column("o_totalprice").to_pylist())


def test_get_objects_lists_domains_products_and_columns(demo_server):
    with connect(demo_server) as conn:
        objects = conn.adbc_get_objects().read_all().to_pylist()
        schema = conn.adbc_get_table_schema("nation", db_schema_filter="crm")
        table_types = conn.adbc_get_table_types()
    catalogs = {c["catalog_name"]: c for c in objects}
    assert list(catalogs) == ["mesh"]
    domains = {s["db_schema_name"]: s for s in catalogs["mesh"]["catalog_db_schemas"]}
    assert sorted(domains) == ["crm", "sales", "supply", "support", "types"]
    tables = {t["table_name"]: t for t in domains["sales"]["db_schema_tables"]}
    assert sorted(tables) == ["lineitem", "orders", "revenue_by_nation"]
    columns = [c["column_name"] for c in tables["orders"]["table_columns"]]
    assert columns[:3] == ["o_orderkey", "o_custkey", "o_orderstatus"]
    assert schema.names == ["n_nationkey", "n_name", "n_regionkey", "n_comment"]
    assert table_types == ["TABLE", "VIEW"]


def test_bound_parameters_with_question_marks(demo_server):
    with connect(demo_server) as conn, conn.cursor() as cur:
        cur.execute("SELECT n_name FROM crm.nation WHERE n_nationkey = ? OR n_name = ? ORDER BY 1", parameters=(6, "JAPAN"))
        assert cur.fetchall() == [("FRANCE",), ("JAPAN",)]
        cur.execute("SELECT n_name FROM crm.nation WHERE n_nationkey = ? OR n_name = ? ORDER BY 1", parameters=(7, "PERU"))
        assert cur.fetchall() == [("GERMANY",), ("PERU",)]


def test_errors_surface_with_meshgate_messages(demo_server):
    with connect(demo_server) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.ProgrammingError, match="DROP is refused: meshgate is read-only"):
            cur.execute("DROP TABLE sales.orders")
        with pytest.raises(adbc_driver_manager.ProgrammingError, match="table 'mesh.sales.nothing' not found"):
            cur.execute("SELECT * FROM sales.nothing")
        cur.execute("SELECT 1 AS one")
        assert cur.fetchall() == [(1,)]


def test_wrong_password_is_refused(demo_server):
    with pytest.raises(adbc_driver_manager.Error, match="invalid username or password"):
        with connect(demo_server, "alice", "wrong-password") as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")


def test_pyarrow_flight_raw_client(demo_server):
    import pyarrow.flight as flight

    client = flight.FlightClient(demo_server.uri)
    header = client.authenticate_basic_token("bob", "bob-demo")
    assert header[0] == b"authorization" and header[1].startswith(b"Bearer ")
    options = flight.FlightCallOptions(headers=[header])
    # A Flight SQL CommandStatementQuery, packed in google.protobuf.Any by hand.
    query = b"SELECT r_name FROM crm.region ORDER BY r_regionkey"
    command = b"\x0a" + bytes([len(query)]) + query
    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    any_message = b"\x0a" + bytes([len(type_url)]) + type_url + b"\x12" + bytes([len(command)]) + command
    info = client.get_flight_info(flight.FlightDescriptor.for_command(any_message), options)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    assert table.column("r_name").to_pylist() == ["AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST"]
    assert table.schema == info.schema


def test_bearer_token_header_instead_of_a_password(demo_server):
    token = demo_server.token("bob")
    with flight_sql.connect(
        demo_server.uri,
        db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {token}"},
        autocommit=True,
    ) as conn, conn.cursor() as cur:
        cur.execute("SELECT c_region FROM crm.customer GROUP BY c_region")
        assert cur.fetchall() == [("AMERICA",)]
    with pytest.raises(adbc_driver_manager.Error, match="(?i)unauthenticated|invalid token"):
        with flight_sql.connect(
            demo_server.uri,
            db_kwargs={"adbc.flight.sql.authorization_header": "Bearer not-a-token"},
            autocommit=True,
        ) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")


def test_fetch_styles(demo_server):
    with connect(demo_server, "carol") as conn, conn.cursor() as cur:
        cur.execute("SELECT r_regionkey, r_name FROM crm.region ORDER BY 1")
        df = cur.fetch_df()
        assert list(df.columns) == ["r_regionkey", "r_name"]
        assert df["r_name"].tolist() == ["AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST"]
        cur.execute("SELECT r_name FROM crm.region ORDER BY r_regionkey")
        assert cur.fetchone() == ("AFRICA",)
        assert cur.fetchmany(2) == [("AMERICA",), ("ASIA",)]
        assert cur.fetchall() == [("EUROPE",), ("MIDDLE EAST",)]
        assert [d[0] for d in cur.description] == ["r_name"]


def test_executemany_is_refused_as_a_write(demo_server):
    with connect(demo_server, "carol") as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error, match="read-only"):
            cur.executemany("SELECT r_name FROM crm.region WHERE r_regionkey = ?", [(1,), (2,)])


def test_get_objects_at_every_depth_with_filters(demo_server):
    with connect(demo_server, "alice") as conn:
        catalogs = conn.adbc_get_objects(depth="catalogs").read_all().to_pylist()
        assert [c["catalog_name"] for c in catalogs] == ["mesh"]
        schemas = conn.adbc_get_objects(depth="db_schemas", db_schema_filter="s%").read_all().to_pylist()
        assert sorted(s["db_schema_name"] for s in schemas[0]["catalog_db_schemas"]) == ["sales", "supply", "support"]
        tables = conn.adbc_get_objects(
            depth="tables", catalog_filter="mesh", table_name_filter="%order%"
        ).read_all().to_pylist()
        found = [
            (s["db_schema_name"], t["table_name"], t["table_type"])
            for s in tables[0]["catalog_db_schemas"]
            for t in s["db_schema_tables"]
        ]
        assert found == [("sales", "orders", "TABLE")]
        columns = conn.adbc_get_objects(
            depth="all", db_schema_filter="crm", table_name_filter="customer", column_name_filter="c_%"
        ).read_all().to_pylist()
        table = columns[0]["catalog_db_schemas"][0]["db_schema_tables"][0]
        names = [c["column_name"] for c in table["table_columns"]]
        # alice's view of crm.customer: c_acctbal is denied.
        assert "c_acctbal" not in names and "c_phone" in names and "c_region" in names
        assert [c["ordinal_position"] for c in table["table_columns"]] == list(range(1, len(names) + 1))
        with pytest.raises(adbc_driver_manager.Error):
            conn.adbc_get_table_schema("no_such_table", db_schema_filter="crm")


def test_cursor_cancel_stops_the_query(demo_server):
    import threading

    with connect(demo_server, "carol") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM range(100000000000) a")  # runs for hours
        reader = cur.fetch_record_batch()
        timer = threading.Timer(1.0, cur.adbc_cancel)
        timer.start()
        # The reader surfaces the driver's cancellation as an OSError.
        with pytest.raises((adbc_driver_manager.Error, OSError), match="(?i)cancel"):
            reader.read_all()
        timer.join()
        # The connection is still good.
        cur.execute("SELECT 1 AS one")
        assert cur.fetchall() == [(1,)]
    _wait_for_audit(demo_server, "SELECT count(*) FROM range(100000000000) a", "cancelled")


def test_client_timeout_ends_the_query(demo_server):
    with connect(demo_server, "carol") as conn, conn.cursor() as cur:
        cur.adbc_statement.set_options(**{"adbc.flight.sql.rpc.timeout_seconds.fetch": "1"})
        with pytest.raises(adbc_driver_manager.Error, match="(?i)deadline|timeout|timed out"):
            cur.execute("SELECT count(*) FROM range(100000000001) b")
            cur.fetchall()
    _wait_for_audit(demo_server, "SELECT count(*) FROM range(100000000001) b", "cancelled")


def _wait_for_audit(server, sql, outcome):
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        records = [r for r in server.audit() if r["sql"] == sql and r["outcome"] == outcome]
        if records:
            return records[0]
        time.sleep(0.1)
    raise AssertionError(f"no audit record of {sql!r} with outcome {outcome}: {server.audit()[-3:]}")


def test_a_ticket_reused_by_another_user_is_refused(demo_server):
    import pyarrow.flight as flight

    alice = flight.FlightClient(demo_server.uri)
    alice_options = flight.FlightCallOptions(headers=[alice.authenticate_basic_token("alice", "alice-demo")])
    query = b"SELECT c_custkey FROM crm.customer"
    command = b"\x0a" + bytes([len(query)]) + query
    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    any_message = b"\x0a" + bytes([len(type_url)]) + type_url + b"\x12" + bytes([len(command)]) + command
    info = alice.get_flight_info(flight.FlightDescriptor.for_command(any_message), alice_options)
    ticket = info.endpoints[0].ticket
    assert alice.do_get(ticket, alice_options).read_all().num_rows > 0

    bob = flight.FlightClient(demo_server.uri)
    bob_options = flight.FlightCallOptions(headers=[bob.authenticate_basic_token("bob", "bob-demo")])
    with pytest.raises(flight.FlightUnauthorizedError, match="another user"):
        bob.do_get(ticket, bob_options).read_all()
    with pytest.raises(flight.FlightUnauthenticatedError):
        flight.FlightClient(demo_server.uri).do_get(ticket).read_all()


def test_a_large_result_streams_in_batches(demo_server):
    import resource

    rows = 3_000_000
    sql = f"SELECT value, repeat('x', 100) AS pad FROM range({rows})"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    server_before = _peak_rss(demo_server.process.pid)
    seen = 0
    batches = 0
    with connect(demo_server, "carol") as conn, conn.cursor() as cur:
        cur.execute(sql)
        reader = cur.fetch_record_batch()
        for batch in reader:
            seen += batch.num_rows
            batches += 1
    total_bytes = rows * (8 + 100)
    client_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    server_growth = _peak_rss(demo_server.process.pid) - server_before
    assert seen == rows
    assert batches > 10
    # Neither side holds the whole result (about 324 MB) at once.
    assert client_growth < total_bytes / 2, (client_growth, total_bytes)
    assert server_growth < total_bytes / 2, (server_growth, total_bytes)


def _peak_rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_low_level_adbc_api(demo_server):
    import adbc_driver_flightsql

    database = adbc_driver_flightsql.connect(
        demo_server.uri, db_kwargs={"username": "carol", "password": "carol-demo"}
    )
    connection = adbc_driver_manager.AdbcConnection(database)
    statement = adbc_driver_manager.AdbcStatement(connection)
    try:
        statement.set_sql_query("SELECT r_regionkey, r_name FROM crm.region WHERE r_regionkey < ? ORDER BY 1")
        statement.prepare()
        statement.bind(pa.record_batch([pa.array([2], pa.int64())], names=["0"]))
        stream, _ = statement.execute_query()
        table = pa.RecordBatchReader._import_from_c(stream.address).read_all()
        assert table.to_pylist() == [
            {"r_regionkey": 0, "r_name": "AFRICA"},
            {"r_regionkey": 1, "r_name": "AMERICA"},
        ]
        info = connection.get_info()
        info_table = pa.RecordBatchReader._import_from_c(info.address).read_all()
        assert 0 in info_table.column("info_name").to_pylist()
    finally:
        statement.close()
        connection.close()
        database.close()
