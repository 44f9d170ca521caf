"""The README's client snippets, run as written against a live server."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).parents[2] / "README.md"


def snippets():
    text = README.read_text()
    found = dict(re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", text, re.S))
    assert set(found) >= {"adbc", "dataframes", "pyarrow", "flightsql"}, found.keys()
    return found


EXPECTED = {
    "adbc": ["orders", "[('FRANCE',)]", "'db_schema_name': 'sales'"],
    "dataframes": ["AMERICA", "MIDDLE EAST"],
    "pyarrow": ["r_name", "AFRICA"],
    "flightsql": ["[['GERMANY']]"],
}


@pytest.mark.parametrize("name", ["adbc", "dataframes", "pyarrow", "flightsql"])
def test_readme_snippet_runs(demo_server, name):
    port = demo_server.uri.rsplit(":", 1)[1]
    code = snippets()[name].replace("grpc://127.0.0.1:50051", demo_server.uri)
    code = code.replace("port=50051", f"port={port}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README:{name}", "exec"), {})
    for expected in EXPECTED[name]:
        assert expected in out.getvalue(), (name, expected, out.getvalue()[:2000])
