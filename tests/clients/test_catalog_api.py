"""The catalog API from Python: stubs generated from the proto with
grpcio-tools, called with the bearer token of each demo user."""

import pathlib
import subprocess
import sys
import tempfile

import grpc
import pytest

PROTO = pathlib.Path(__file__).parents[2] / "proto"


@pytest.fixture(scope="module")
def stubs():
    with tempfile.TemporaryDirectory(prefix="meshgate-stubs-") as out:
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}", f"--python_out={out}",
             f"--grpc_python_out={out}", str(PROTO / "meshgate/catalog/v1/catalog.proto")],
            check=True,
        )
        sys.path.insert(0, out)
        try:
            from meshgate.catalog.v1 import catalog_pb2, catalog_pb2_grpc

            yield catalog_pb2, catalog_pb2_grpc
        finally:
            sys.path.remove(out)


def client(demo_server, stubs, user):
    pb, rpc = stubs
    channel = grpc.insecure_channel(demo_server.uri.removeprefix("grpc://"))
    metadata = [("authorization", f"Bearer {demo_server.token(user)}")]
    stub = rpc.CatalogServiceStub(channel)
    return pb, stub, metadata


def test_products_differ_between_users(demo_server, stubs):
    pb, alice, alice_md = client(demo_server, stubs, "alice")
    _, dave, dave_md = client(demo_server, stubs, "dave")
    alice_sees = {p.name for p in alice.ListProducts(pb.ListProductsRequest(), metadata=alice_md).products}
    dave_sees = {p.name for p in dave.ListProducts(pb.ListProductsRequest(), metadata=dave_md).products}
    assert "crm.customer" in alice_sees and "crm.customer" not in dave_sees
    assert "supply.part" in dave_sees
    with pytest.raises(grpc.RpcError) as denied:
        dave.GetProduct(pb.GetProductRequest(name="crm.customer"), metadata=dave_md)
    assert denied.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_product_as_each_user_sees_it(demo_server, stubs):
    pb, alice, alice_md = client(demo_server, stubs, "alice")
    _, bob, bob_md = client(demo_server, stubs, "bob")
    as_alice = alice.GetProduct(pb.GetProductRequest(name="crm.customer"), metadata=alice_md)
    as_bob = bob.GetProduct(pb.GetProductRequest(name="crm.customer"), metadata=bob_md)
    alice_columns = {c.name: c for c in as_alice.columns}
    bob_columns = {c.name: c for c in as_bob.columns}
    assert as_alice.owner == "crm-data@acme.example"
    assert "c_acctbal" not in alice_columns
    assert alice_columns["c_phone"].masked and list(alice_columns["c_phone"].tags) == ["pii"]
    assert not bob_columns["c_phone"].masked
    view = alice.GetProduct(pb.GetProductRequest(name="sales.revenue_by_nation"), metadata=alice_md)
    assert view.kind == "view"
    assert list(view.reads) == ["crm.customer", "crm.nation", "sales.orders"]
    pb, rpc = stubs
    with pytest.raises(grpc.RpcError) as anonymous:
        rpc.CatalogServiceStub(grpc.insecure_channel(demo_server.uri.removeprefix("grpc://"))).ListDomains(
            pb.ListDomainsRequest())
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
