"""The Python ADBC driver over grpc+tls://, and with a client certificate
when the gateway requires mutual TLS. Certificates are made with openssl."""

import pathlib
import subprocess
import tempfile

import adbc_driver_flightsql.dbapi as flight_sql
import pytest

from conftest import SCALE, meshgate_binary, serve


def openssl(cwd, *args):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: pathlib.Path):
    openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=meshgate test CA")
    for name, cn, ext in [
        ("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "alice", "extendedKeyUsage=clientAuth"),
    ]:
        openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={cn}")
        (d / f"{name}.ext").write_text(ext)
        openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


def start(root: pathlib.Path, mutual: bool):
    binary = meshgate_binary()
    config = root / "meshgate.toml"
    tls = f'[server.tls]\ncert_file = "{root}/server.pem"\nkey_file = "{root}/server.key"\n'
    if mutual:
        tls += f'client_ca_file = "{root}/ca.pem"\n'
    text = config.read_text().replace("\n[auth]", f"\n{tls}\n[auth]", 1)
    config.write_text(text)
    process, out, first = serve(binary, config, root / f"stdout-{mutual}.log")
    assert first.startswith("meshgate listening on grpc+tls://"), first
    port = first.split()[3].rsplit(":", 1)[1]
    # Restore the config for the next server.
    config.write_text(text.replace(f"\n{tls}\n[auth]", "\n[auth]", 1))
    return process, out, f"grpc+tls://localhost:{port}"


@pytest.fixture(scope="module")
def tls_root():
    binary = meshgate_binary()
    with tempfile.TemporaryDirectory(prefix="meshgate-tls-") as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([binary, "demo", str(root), "--scale", SCALE], check=True, capture_output=True)
        make_certs(root)
        yield root


def query(uri, root, **extra):
    kwargs = {
        "username": "alice",
        "password": "alice-demo",
        "adbc.flight.sql.client_option.tls_root_certs": (root / "ca.pem").read_text(),
        **extra,
    }
    with flight_sql.connect(uri, db_kwargs=kwargs, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) AS n FROM crm.nation")
            return cur.fetchall()


def test_adbc_over_tls(tls_root):
    process, out, uri = start(tls_root, mutual=False)
    try:
        assert query(uri, tls_root) == [(25,)]
        # A client that does not trust the gateway's CA is refused.
        with pytest.raises(Exception):
            query(uri, tls_root, **{"adbc.flight.sql.client_option.tls_root_certs": (tls_root / "client.pem").read_text()})
    finally:
        process.terminate()
        process.wait(timeout=30)
        out.close()


def test_adbc_with_mutual_tls(tls_root):
    process, out, uri = start(tls_root, mutual=True)
    try:
        client = {
            "adbc.flight.sql.client_option.mtls_cert_chain": (tls_root / "client.pem").read_text(),
            "adbc.flight.sql.client_option.mtls_private_key": (tls_root / "client.key").read_text(),
        }
        assert query(uri, tls_root, **client) == [(25,)]
        # Without a client certificate the gateway does not serve.
        with pytest.raises(Exception):
            query(uri, tls_root)
    finally:
        process.terminate()
        process.wait(timeout=30)
        out.close()
