"""Notebooks: polars and pandas reading through an ADBC connection."""

import adbc_driver_flightsql.dbapi as flight_sql
import pandas as pd
import polars as pl


def connect(server, user="carol"):
    return flight_sql.connect(
        server.uri, db_kwargs={"username": user, "password": f"{user}-demo"}, autocommit=True
    )


def test_polars_read_database(demo_server):
    with connect(demo_server) as conn:
        df = pl.read_database(
            "SELECT n_regionkey, count(*) AS nations FROM crm.nation GROUP BY n_regionkey ORDER BY 1",
            connection=conn,
        )
    assert df.columns == ["n_regionkey", "nations"]
    assert df["nations"].to_list() == [5, 5, 5, 5, 5]
    assert df.schema["n_regionkey"] == pl.Int64


def test_polars_sees_the_callers_policies(demo_server):
    with connect(demo_server, "alice") as conn:
        df = pl.read_database("SELECT c_region, c_phone FROM crm.customer", connection=conn)
    assert df["c_region"].unique().to_list() == ["EUROPE"]
    assert df["c_phone"].unique().to_list() == ["***"]


def test_pandas_read_sql(demo_server):
    with connect(demo_server) as conn:
        df = pd.read_sql("SELECT r_regionkey, r_name FROM crm.region ORDER BY r_regionkey", conn)
    assert df["r_name"].tolist() == ["AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST"]
    assert str(df["r_regionkey"].dtype) == "int64"
