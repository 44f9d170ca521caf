"""Every Arrow type a product can hold round-trips to ADBC with the same
values and a type the client reads; empty results keep their schema."""

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa
import pytest

from conftest import all_types_table

# Parquet has no second unit: such timestamps are stored, and so read back,
# in milliseconds. The Arrow IPC product keeps every type as written.
PARQUET_TYPE = {"ts_s": pa.timestamp("ms")}


def connect(server):
    return flight_sql.connect(
        server.uri, db_kwargs={"username": "carol", "password": "carol-demo"}, autocommit=True
    )


@pytest.fixture(scope="module")
def fetched(demo_server):
    tables = {}
    with connect(demo_server) as conn, conn.cursor() as cur:
        for product in ["all_types", "all_types_ipc"]:
            cur.execute(f"SELECT * FROM types.{product}")
            tables[product] = cur.fetch_arrow_table()
    return tables


@pytest.mark.parametrize("product", ["all_types", "all_types_ipc"])
@pytest.mark.parametrize("name", all_types_table().column_names)
def test_each_type_round_trips(fetched, product, name):
    expected = all_types_table().column(name)
    got = fetched[product].column(name)
    expected_type = PARQUET_TYPE.get(name, expected.type) if product == "all_types" else expected.type
    assert got.type == expected_type, name
    assert got.to_pylist() == expected.to_pylist(), name
    assert got.null_count == 1, name


def test_types_survive_expressions(demo_server):
    with connect(demo_server) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT dec * 2 AS dec2, ts_us_tz, upper(s) AS su, lst, st['a'] AS sa "
            "FROM types.all_types WHERE i8 = -128"
        )
        table = cur.fetch_arrow_table()
    row = table.to_pylist()[0]
    assert str(row["dec2"]) == "24691.34"
    assert row["su"] == "HÉLLO"
    assert row["lst"] == [1, 2, None]
    assert row["sa"] == 1
    assert table.schema.field("ts_us_tz").type == pa.timestamp("us", tz="Europe/Paris")


def test_empty_results_keep_their_schema(demo_server):
    with connect(demo_server) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM types.all_types WHERE i8 > 200")
        table = cur.fetch_arrow_table()
    assert table.num_rows == 0
    assert table.schema.names == all_types_table().column_names
    assert table.schema.field("dec").type == pa.decimal128(15, 2)
    assert table.schema.field("st").type == pa.struct([("a", pa.int64()), ("b", pa.string())])
