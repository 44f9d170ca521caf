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
    assert sorted(domains) == ["crm", "sales", "supply"]
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
