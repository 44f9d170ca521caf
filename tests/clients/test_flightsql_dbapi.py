"""flightsql-dbapi (Superset's `datafusion+flightsql://`) against the demo mesh:
its DB-API cursor, parameters bound to the handle it prepared, its metadata
calls and its SQLAlchemy dialect."""

from urllib.parse import urlparse

import pytest
import sqlalchemy as sa
from flightsql import FlightSQLClient, TableRef
import flightsql.dbapi as dbapi
import flightsql.sqlalchemy  # noqa: F401  (registers `datafusion.flightsql`)


def client(server, user="alice"):
    address = urlparse(server.uri)
    return FlightSQLClient(
        host=address.hostname, port=address.port, insecure=True, user=user, password=f"{user}-demo"
    )


def read(client, info):
    # The client reads the first endpoint only.
    return client.do_get(info.endpoints[0].ticket).read_all()


def test_cursor_reads_rows_with_the_callers_policies(demo_server):
    with dbapi.connect(client(demo_server)) as connection:
        cursor = connection.cursor()
        cursor.execute("SELECT c_custkey, c_phone, c_region FROM crm.customer ORDER BY c_custkey LIMIT 3")
        assert [column[0] for column in cursor.description] == ["c_custkey", "c_phone", "c_region"]
        rows = cursor.fetchall()
        assert len(rows) == 3
        assert all(phone == "***" and region == "EUROPE" for _, phone, region in rows)


def test_parameters_bound_to_the_prepared_handle(demo_server):
    # The client binds, ignores the handle the bind answers with, and runs
    # the one it prepared: each execution sees its own values.
    with dbapi.connect(client(demo_server)) as connection:
        cursor = connection.cursor()
        for key, name in [(6, "FRANCE"), (7, "GERMANY"), (24, "UNITED STATES")]:
            cursor.execute("SELECT n_name FROM crm.nation WHERE n_nationkey = ?", [key])
            assert cursor.fetchall() == [[name]]
        cursor.execute("SELECT count(*) FROM crm.customer WHERE c_region = ?", ["AMERICA"])
        assert cursor.fetchall() == [[0]], "bound values do not reach hidden rows"


def test_metadata_calls_are_well_formed(demo_server):
    mesh = client(demo_server)
    assert read(mesh, mesh.get_catalogs()).column("catalog_name").to_pylist() == ["mesh"]
    schemas = read(mesh, mesh.get_db_schemas()).column("db_schema_name").to_pylist()
    assert {"crm", "sales", "supply"} <= set(schemas)
    tables = read(mesh, mesh.get_tables(include_schema=True)).to_pylist()
    assert ("crm", "customer") in {(t["db_schema_name"], t["table_name"]) for t in tables}
    assert set(read(mesh, mesh.get_table_types()).column("table_type").to_pylist()) == {"TABLE", "VIEW"}
    customer = TableRef(catalog="mesh", db_schema="crm", table="customer")
    for keys in (mesh.get_primary_keys(customer), mesh.get_imported_keys(customer), mesh.get_exported_keys(customer)):
        assert read(mesh, keys).num_rows == 0
    assert read(mesh, mesh.get_xdbc_type_info(None)).num_rows > 0
    # The codes the SQLAlchemy dialect asks for at connect.
    info = dict(zip(*read(mesh, mesh.get_sql_info([0, 2, 3, 504])).to_pydict().values()))
    assert info[0] == "meshgate" and info[3] is True and info[504] == '"'


def test_writes_are_refused(demo_server):
    mesh = client(demo_server)
    with pytest.raises(Exception, match="read-only"):
        mesh.execute_update("DELETE FROM crm.customer")
    with dbapi.connect(mesh) as connection:
        with pytest.raises(Exception, match="read-only"):
            connection.cursor().execute("DELETE FROM crm.customer")


def test_sqlalchemy_dialect_reflects_and_queries(demo_server):
    address = urlparse(demo_server.uri)
    engine = sa.create_engine(
        f"datafusion+flightsql://alice:alice-demo@{address.hostname}:{address.port}?insecure=true"
    )
    inspector = sa.inspect(engine)
    assert {"crm", "sales", "supply"} <= set(inspector.get_schema_names())
    assert "customer" in inspector.get_table_names(schema="crm")
    columns = [column["name"] for column in inspector.get_columns("customer", schema="crm")]
    assert "c_phone" in columns and "c_acctbal" not in columns, "a denied column is absent"
    with engine.connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM crm.nation")).scalar()
    assert count == 25
