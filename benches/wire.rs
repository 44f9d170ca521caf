//! What turning string views into the wire's plain strings costs: the
//! string columns of 2M lineitem-like rows (flags of one character, short
//! instructions and modes, comments of 10 to 43 bytes), in batches of
//! 32 768 rows as a scan yields them, converted by `to_wire_batch` and, side
//! by side, by Arrow's cast. The batches are many and distinct, so that the
//! views are read from memory as they are in a stream. Run with
//! `cargo bench --bench wire`.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringViewBuilder};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use criterion::{Criterion, criterion_group, criterion_main};
use meshgate::query::{to_wire_batch, wire_schema};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The allocator the meshgate binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCHES: usize = 64;
const ROWS: usize = 32_768;

/// A column's value for a random number.
type Value = fn(u64) -> String;

/// Each column's name and values.
const COLUMNS: [(&str, Value); 5] = [
    ("returnflag", |r| ["A", "N", "R"][(r % 3) as usize].into()),
    ("linestatus", |r| ["O", "F"][(r % 2) as usize].into()),
    ("shipinstruct", |r| {
        [
            "DELIVER IN PERSON",
            "COLLECT COD",
            "NONE",
            "TAKE BACK RETURN",
        ][(r % 4) as usize]
            .into()
    }),
    ("shipmode", |r| {
        ["AIR", "MAIL", "SHIP", "TRUCK", "RAIL", "REG AIR", "FOB"][(r % 7) as usize].into()
    }),
    ("comment", |r| {
        let words = ["furiously ", "slyly ", "carefully ", "blithely ", "ironic "];
        let mut comment = String::new();
        let mut r = r;
        while comment.len() < 43 {
            comment.push_str(words[(r % 5) as usize]);
            r /= 5;
        }
        comment.truncate(10 + (r % 34) as usize);
        comment
    }),
];

fn batches() -> Vec<RecordBatch> {
    let schema = Arc::new(Schema::new(
        COLUMNS
            .iter()
            .map(|(name, _)| Field::new(*name, DataType::Utf8View, false))
            .collect::<Vec<_>>(),
    ));
    // Seeded: the same rows at every run.
    let mut random = StdRng::seed_from_u64(7);
    (0..BATCHES)
        .map(|_| {
            let columns = COLUMNS
                .iter()
                .map(|(_, value)| {
                    let mut builder = StringViewBuilder::with_capacity(ROWS);
                    for _ in 0..ROWS {
                        builder.append_value(value(random.random()));
                    }
                    Arc::new(builder.finish()) as ArrayRef
                })
                .collect();
            RecordBatch::try_new(Arc::clone(&schema), columns).unwrap()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let batches = batches();
    let wire = wire_schema(&batches[0].schema());
    let mut group = c.benchmark_group("string views to the wire (2M rows)");
    group.sample_size(20);
    group.bench_function("to_wire_batch", |b| {
        b.iter(|| {
            for batch in &batches {
                std::hint::black_box(to_wire_batch(batch.clone(), &wire).unwrap());
            }
        })
    });
    group.bench_function("arrow cast", |b| {
        b.iter(|| {
            for batch in &batches {
                for column in batch.columns() {
                    std::hint::black_box(cast(column, &DataType::Utf8).unwrap());
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
