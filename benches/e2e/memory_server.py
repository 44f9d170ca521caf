"""A Flight server holding a Parquet file's rows in memory as the wire sends
them (plain strings, record batches of 8 192 rows), for the streaming part of
the end-to-end benchmark: what an ADBC client takes when the server costs
next to nothing. It answers statement queries with the whole file, and every
other call as unimplemented.

usage: memory_server.py FILE.parquet   (prints `port N` once it serves)
"""

import sys

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq


def plain(field: pa.Field) -> pa.Field:
    if pa.types.is_string_view(field.type) or pa.types.is_large_string(field.type):
        return field.with_type(pa.string())
    return field


class MemoryServer(flight.FlightServerBase):
    def __init__(self, path: str):
        super().__init__("grpc://127.0.0.1:0")
        table = pq.read_table(path)
        table = table.cast(pa.schema([plain(f) for f in table.schema]))
        self.schema = table.schema
        # Each batch in buffers of its own, as a server decoding the file
        # would have it (not slices of the row groups).
        self.batches = [
            pa.RecordBatch.from_arrays([pa.concat_arrays([c]) for c in b.columns], schema=b.schema)
            for b in table.to_batches(max_chunksize=8192)
        ]
        self.rows = table.num_rows

    def get_flight_info(self, context, descriptor):
        if b"CommandStatementQuery" not in descriptor.command:
            raise NotImplementedError("only statement queries")
        endpoint = flight.FlightEndpoint(b"all", [])
        return flight.FlightInfo(self.schema, descriptor, [endpoint], self.rows, -1)

    def do_get(self, context, ticket):
        return flight.GeneratorStream(self.schema, iter(self.batches))


if __name__ == "__main__":
    server = MemoryServer(sys.argv[1])
    print(f"port {server.port}", flush=True)
    server.serve()
