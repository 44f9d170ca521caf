"""Products in cloud object storage, read from real servers on loopback with
each storage's own endpoint and credentials: S3 (moto's server) with
Parquet, CSV and JSON files under the caller's policies, a store that goes
down and comes back, and one that is down when the gateway starts; Azure
Blob Storage (Azurite)."""

import io
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time

import adbc_driver_flightsql.dbapi as flightsql
import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from conftest import SCALE, meshgate_binary, serve, serve_with_http

# A domain on the bucket `lake` of the S3 server at `endpoint`, its first
# product, and then those of each test.
BUCKET = """
name = "{name}"
owner = "lake@acme.example"
description = "{description}"

[storage.bucket]
type = "object_store"
url = "s3://lake/crm"
options = {{ endpoint = "{endpoint}", allow_http = true, region = "eu-west-1", access_key_id = "lake-reader", secret_access_key = "{secret}" }}

[[products]]
name = "accounts"
description = "One row per account"
storage = "bucket"
location = "accounts/"
format = "parquet"
"""

# The other products and the policies.
LAKE_PRODUCTS = """

[[products]]
name = "regions"
description = "One row per region"
storage = "bucket"
location = "regions.csv"
format = "csv"
columns = [
  { name = "name", type = "Utf8" },
  { name = "id", type = "Int64" },
]

[[products]]
name = "events"
description = "One row per event"
storage = "bucket"
location = "events.json"
format = "json"

[[policies]]
product = "accounts"
row_filter = "region = user_attr('region')"
columns.email = { mask = "'***'", unless = "has_group('pii_reader')" }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def put_files(endpoint: str):
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="eu-west-1",
                      aws_access_key_id="lake-reader", aws_secret_access_key="lake-secret")
    s3.create_bucket(Bucket="lake", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    for part, ids in enumerate([[1, 2, 3], [4, 5, 6]]):
        table = pa.table({
            "id": pa.array(ids, pa.int64()),
            "region": pa.array(["EUROPE" if i % 2 else "AMERICA" for i in ids]),
            "email": pa.array([f"user{i}@acme.example" for i in ids]),
        })
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        s3.put_object(Bucket="lake", Key=f"crm/accounts/part-{part}.parquet", Body=buffer.getvalue())
    s3.put_object(Bucket="lake", Key="crm/regions.csv", Body=b"id,name\n1,EUROPE\n2,AMERICA\n")
    events = "\n".join(json.dumps({"id": i, "kind": k}) for i, k in [(1, "open"), (2, "close")])
    s3.put_object(Bucket="lake", Key="crm/events.json", Body=events.encode())


@pytest.fixture(scope="module")
def lake():
    lake = {}
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3_server.start()
    put_files(endpoint)
    binary = meshgate_binary()
    with tempfile.TemporaryDirectory(prefix="meshgate-s3-") as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([binary, "demo", str(root), "--scale", SCALE], check=True, capture_output=True)
        domain = BUCKET.format(name="lake", description="Files in a bucket", endpoint=endpoint,
                               secret="${LAKE_S3_SECRET}")
        (root / "domains" / "lake.toml").write_text(domain + LAKE_PRODUCTS)
        os.environ["LAKE_S3_SECRET"] = "lake-secret"
        process, files, flight_uri, http = serve_with_http(binary, root / "meshgate.toml", root)
        try:
            assert flight_uri and http, (root / "stderr.log").read_text()
            lake.update(uri=flight_uri, http=http, port=port, s3=s3_server)
            yield lake
        finally:
            process.terminate()
            process.wait(timeout=30)
            for file in files:
                file.close()
            lake["s3"].stop()


def query(uri: str, user: str, sql: str):
    with flightsql.connect(uri, db_kwargs={"username": user, "password": f"{user}-demo"}) as conn:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()


def readiness(http: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{http}/readyz", timeout=30) as answer:
        return answer.read().decode()


def test_products_on_s3_are_read_under_the_callers_policies(lake):
    uri = lake["uri"]
    sql = "SELECT id, region, email FROM lake.accounts ORDER BY id"
    # alice: EUROPE, no pii_reader; bob: AMERICA, pii_reader.
    assert query(uri, "alice", sql) == [
        (1, "EUROPE", "***"), (3, "EUROPE", "***"), (5, "EUROPE", "***"),
    ]
    assert query(uri, "bob", sql) == [
        (2, "AMERICA", "user2@acme.example"),
        (4, "AMERICA", "user4@acme.example"),
        (6, "AMERICA", "user6@acme.example"),
    ]
    assert query(uri, "alice", "SELECT count(*) FROM lake.accounts WHERE id = 3") == [(1,)]
    # Declared CSV columns are placed by the header's names.
    assert query(uri, "alice", "SELECT id, name FROM lake.regions ORDER BY id") == [
        (1, "EUROPE"), (2, "AMERICA"),
    ]
    assert query(uri, "alice", "SELECT kind FROM lake.events ORDER BY id") == [("open",), ("close",)]
    # Across domains: the S3 product joins the demo's local files.
    joined = query(uri, "alice", "SELECT count(*) FROM lake.regions r "
                                 "JOIN crm.region c ON r.name = c.r_name")
    assert joined == [(2,)]


def test_a_store_that_goes_down_fails_only_its_products_and_comes_back(lake):
    uri = lake["uri"]
    assert "source lake.bucket: reachable" in readiness(lake["http"])
    lake["s3"].stop()
    time.sleep(5.5)  # the readiness probe is reused for 5 s
    try:
        body = readiness(lake["http"])
        assert "ready: " in body and "source lake.bucket: unreachable: " in body, body
        with pytest.raises(flightsql.Error) as failed:
            query(uri, "alice", "SELECT count(*) FROM lake.accounts")
        message = str(failed.value)
        assert "UNAVAILABLE" in message or "Unavailable" in message, message
        assert "lake.accounts" in message, message
        assert query(uri, "alice", "SELECT count(*) FROM crm.region") == [(5,)]
    finally:
        # moto keeps its buckets in the process: a new server serves them.
        lake["s3"] = ThreadedMotoServer(ip_address="127.0.0.1", port=lake["port"], verbose=False)
        lake["s3"].start()
    assert query(uri, "alice", "SELECT count(*) FROM lake.accounts") == [(3,)]


# The first product's declared columns, then the other products.
COLD_PRODUCTS = """columns = [{ name = "id", type = "Int64" }, { name = "email", type = "Utf8" }]

[[products]]
name = "undeclared"
description = "Its schema is the files'"
storage = "bucket"
location = "regions.csv"
format = "csv"

[[policies]]
product = "accounts"
row_filter = "id > 2"
"""


def test_a_product_whose_store_is_down_at_start_is_published_from_its_declared_columns(lake):
    port = free_port()
    binary = meshgate_binary()
    with tempfile.TemporaryDirectory(prefix="meshgate-s3-down-") as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([binary, "demo", str(root), "--scale", SCALE], check=True, capture_output=True)
        domain = BUCKET.format(name="cold", description="A bucket that is down when the gateway starts",
                               endpoint=f"http://127.0.0.1:{port}", secret="lake-secret")
        (root / "domains" / "cold.toml").write_text(domain + COLD_PRODUCTS)
        process, out, first = serve(binary, root / "meshgate.toml", root / "stdout.log")
        s3_server = None
        try:
            assert first.startswith("meshgate listening on grpc://"), first
            uri = first.split()[3]
            with pytest.raises(flightsql.Error) as failed:
                query(uri, "alice", "SELECT id FROM cold.accounts")
            assert "cold.accounts" in str(failed.value), str(failed.value)
            assert "Unavailable" in str(failed.value) or "UNAVAILABLE" in str(failed.value)
            # A product without declared columns has no schema to publish.
            with pytest.raises(flightsql.Error) as failed:
                query(uri, "alice", "SELECT * FROM cold.undeclared")
            assert "not found" in str(failed.value), str(failed.value)
            # The store comes up: the next query opens the product, under
            # its policy.
            s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            s3_server.start()
            assert query(uri, "alice", "SELECT id, email FROM cold.accounts ORDER BY id") == [
                (i, f"user{i}@acme.example") for i in range(3, 7)
            ]
        finally:
            process.terminate()
            process.wait(timeout=30)
            out.close()
            if s3_server:
                s3_server.stop()


AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

BLOB_DOMAIN = """
name = "blob"
owner = "lake@acme.example"
description = "Files in an Azure container"

[storage.container]
type = "object_store"
url = "az://lake/crm"
options = {{ account_name = "{account}", access_key = "{key}", endpoint = "{endpoint}", allow_http = true }}

[[products]]
name = "accounts"
description = "One row per account"
storage = "container"
location = "accounts/"
format = "parquet"

[[policies]]
product = "accounts"
row_filter = "region = user_attr('region')"
"""


def test_products_in_an_azure_container_are_read_under_the_callers_policies():
    from azure.storage.blob import BlobServiceClient

    azurite = os.environ.get("MESHGATE_AZURITE")
    assert azurite, "MESHGATE_AZURITE names Azurite's azurite-blob (scripts/test installs it)"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    binary = meshgate_binary()
    with tempfile.TemporaryDirectory(prefix="meshgate-az-") as tmp:
        root = pathlib.Path(tmp)
        storage = subprocess.Popen(
            [azurite, "--blobHost", "127.0.0.1", "--blobPort", str(port),
             "--location", str(root / "azurite"), "--silent", "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        process = out = None
        try:
            service = BlobServiceClient.from_connection_string(
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"
            )
            container = None
            deadline = time.monotonic() + 60
            while container is None:
                try:
                    container = service.create_container("lake")
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            for part, ids in enumerate([[1, 2], [3, 4]]):
                table = pa.table({
                    "id": pa.array(ids, pa.int64()),
                    "region": pa.array(["EUROPE" if i % 2 else "AMERICA" for i in ids]),
                })
                buffer = io.BytesIO()
                pq.write_table(table, buffer)
                container.upload_blob(f"crm/accounts/part-{part}.parquet", buffer.getvalue())
            subprocess.run([binary, "demo", str(root), "--scale", SCALE], check=True, capture_output=True)
            (root / "domains" / "blob.toml").write_text(
                BLOB_DOMAIN.format(account=AZURITE_ACCOUNT, key=AZURITE_KEY, endpoint=endpoint))
            process, out, first = serve(binary, root / "meshgate.toml", root / "stdout.log")
            assert first.startswith("meshgate listening on grpc://"), first
            uri = first.split()[3]
            sql = "SELECT id, region FROM blob.accounts ORDER BY id"
            assert query(uri, "alice", sql) == [(1, "EUROPE"), (3, "EUROPE")]
            assert query(uri, "bob", sql) == [(2, "AMERICA"), (4, "AMERICA")]
        finally:
            if process:
                process.terminate()
                process.wait(timeout=30)
                out.close()
            storage.terminate()
            storage.wait(timeout=30)
