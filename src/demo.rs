//! The embedded demo mesh: three domains over a TPC-H-derived dataset in four
//! file formats, generated on first start so that `meshgate serve` needs no
//! external server.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::error::ArrowError;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow,
    SupplierArrow,
};

use crate::query::{to_wire_batch, wire_schema};

/// The demo's config files, relative to its directory.
pub const DEMO_CONFIG_FILES: &[(&str, &str)] = &[
    (
        "meshgate.toml",
        include_str!("../config/demo/meshgate.toml"),
    ),
    (
        "domains/sales.toml",
        include_str!("../config/demo/domains/sales.toml"),
    ),
    (
        "domains/crm.toml",
        include_str!("../config/demo/domains/crm.toml"),
    ),
    (
        "domains/supply.toml",
        include_str!("../config/demo/domains/supply.toml"),
    ),
    (
        "domains/support.toml",
        include_str!("../config/demo/domains/support.toml"),
    ),
];

/// Scale factor of the demo data (0.1: 600k line items, 150k orders).
pub const DEFAULT_DEMO_SCALE: f64 = 0.1;

/// Writes the demo config into `dir` (files that exist are left alone).
pub fn write_demo_config(dir: &Path) -> std::io::Result<PathBuf> {
    for (name, text) in DEMO_CONFIG_FILES {
        let path = dir.join(name);
        if !path.exists() {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&path, text)?;
        }
    }
    Ok(dir.join("meshgate.toml"))
}

/// The file that marks complete demo data of this layout and scale.
pub fn data_marker(dir: &Path, scale: f64) -> PathBuf {
    dir.join("data").join(format!(".complete-v3-sf{scale}"))
}

/// Generates the demo data under `dir/data` unless it is already there at
/// this scale. Returns whether it generated anything.
pub fn ensure_demo_data(dir: &Path, scale: f64) -> Result<bool, String> {
    let data = dir.join("data");
    let marker = data_marker(dir, scale);
    if marker.exists() {
        return Ok(false);
    }
    if data.exists() {
        fs::remove_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    }
    generate(&data, scale)
        .map_err(|e| format!("generating demo data in {}: {e}", data.display()))?;
    fs::write(&marker, b"").map_err(|e| format!("{}: {e}", marker.display()))?;
    Ok(true)
}

#[derive(Debug, thiserror::Error)]
enum GenerateError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Arrow(#[from] ArrowError),
    #[error("{0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
}

fn generate(data: &Path, scale: f64) -> Result<(), GenerateError> {
    for domain in ["sales", "crm", "supply", "support"] {
        fs::create_dir_all(data.join(domain))?;
    }
    // sales: orders as a directory of two Parquet files, lineitem as one.
    fs::create_dir_all(data.join("sales/orders"))?;
    for part in 1..=2 {
        write_parquet(
            &data.join(format!("sales/orders/part-{part}.parquet")),
            OrderArrow::schema_ref(),
            OrderArrow::new(OrderGenerator::new(scale, part, 2)),
        )?;
    }
    write_parquet(
        &data.join("sales/lineitem.parquet"),
        LineItemArrow::schema_ref(),
        LineItemArrow::new(LineItemGenerator::new(scale, 1, 1)),
    )?;
    // crm: customers in Parquet (with their region's name, which the demo's
    // row filters use), the small reference tables in CSV.
    let regions = customer_regions(scale)?;
    let customer_schema = with_region(&CustomerArrow::schema_ref());
    let customers = CustomerArrow::new(CustomerGenerator::new(scale, 1, 1));
    write_parquet(
        &data.join("crm/customer.parquet"),
        Arc::clone(&customer_schema),
        customers.map(move |batch| add_region(batch?, &customer_schema, &regions)),
    )?;
    write_csv(
        &data.join("crm/nation.csv"),
        NationArrow::schema_ref(),
        NationArrow::new(NationGenerator::new(scale, 1, 1)),
    )?;
    write_csv(
        &data.join("crm/region.csv"),
        RegionArrow::schema_ref(),
        RegionArrow::new(RegionGenerator::new(scale, 1, 1)),
    )?;
    // supply: CSV, newline-delimited JSON and Arrow IPC.
    write_csv(
        &data.join("supply/part.csv"),
        PartArrow::schema_ref(),
        PartArrow::new(PartGenerator::new(scale, 1, 1)),
    )?;
    write_json(
        &data.join("supply/supplier.json"),
        SupplierArrow::schema_ref(),
        SupplierArrow::new(SupplierGenerator::new(scale, 1, 1)),
    )?;
    write_arrow(
        &data.join("supply/partsupp.arrow"),
        PartSuppArrow::schema_ref(),
        PartSuppArrow::new(PartSuppGenerator::new(scale, 1, 1)),
    )?;
    // support: tickets in a SQLite database, one for every fourth customer.
    write_tickets(&data.join("support/helpdesk.sqlite"), scale)?;
    Ok(())
}

fn write_tickets(path: &Path, scale: f64) -> Result<(), GenerateError> {
    let mut db = rusqlite::Connection::open(path)?;
    db.execute_batch(
        "CREATE TABLE tickets (
           ticket_id INTEGER PRIMARY KEY, c_custkey INTEGER NOT NULL,
           priority TEXT NOT NULL, status TEXT NOT NULL, opened DATE NOT NULL);
         CREATE INDEX tickets_customer ON tickets (c_custkey);",
    )?;
    let customers = (150_000.0 * scale).round() as i64;
    let start = chrono::NaiveDate::from_ymd_opt(1995, 1, 1).expect("a valid date");
    let tx = db.transaction()?;
    {
        let mut insert = tx.prepare("INSERT INTO tickets VALUES (?1, ?2, ?3, ?4, ?5)")?;
        for custkey in (4..=customers).step_by(4) {
            let priority = ["low", "medium", "high"][(custkey % 3) as usize];
            let status = if custkey % 5 == 0 { "open" } else { "closed" };
            let opened = start + chrono::Duration::days(custkey % 730);
            insert.execute(rusqlite::params![
                custkey / 4,
                custkey,
                priority,
                status,
                opened.format("%Y-%m-%d").to_string()
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Region name by nation key, from the generated nation and region tables.
fn customer_regions(scale: f64) -> Result<HashMap<i64, String>, ArrowError> {
    let mut region_names = HashMap::new();
    for batch in RegionArrow::new(RegionGenerator::new(scale, 1, 1)) {
        let batch = to_wire_batch(batch?, &wire_schema(&RegionArrow::schema_ref()))?;
        let keys = batch.column(0).as_primitive::<Int64Type>();
        let names = batch.column(1).as_string::<i32>();
        for row in 0..batch.num_rows() {
            region_names.insert(keys.value(row), names.value(row).to_string());
        }
    }
    let mut by_nation = HashMap::new();
    for batch in NationArrow::new(NationGenerator::new(scale, 1, 1)) {
        let batch = batch?;
        let nations = batch.column(0).as_primitive::<Int64Type>();
        let regions = batch.column(2).as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            if let Some(name) = region_names.get(&regions.value(row)) {
                by_nation.insert(nations.value(row), name.clone());
            }
        }
    }
    Ok(by_nation)
}

fn with_region(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("c_region", DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

fn add_region(
    batch: RecordBatch,
    schema: &SchemaRef,
    regions: &HashMap<i64, String>,
) -> Result<RecordBatch, ArrowError> {
    let nations = batch
        .column_by_name("c_nationkey")
        .ok_or_else(|| ArrowError::SchemaError("customer has no c_nationkey".into()))?
        .as_primitive::<Int64Type>();
    let region: StringArray = nations
        .iter()
        .map(|n| n.and_then(|n| regions.get(&n).map(String::as_str)))
        .collect();
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(region));
    RecordBatch::try_new(Arc::clone(schema), columns)
}

/// Batches in plain types (Utf8 rather than Utf8View), as every reader knows them.
fn plain(
    schema: &SchemaRef,
    batches: impl Iterator<Item = Result<RecordBatch, ArrowError>>,
) -> (
    SchemaRef,
    impl Iterator<Item = Result<RecordBatch, ArrowError>>,
) {
    let wire = wire_schema(schema);
    let target = Arc::clone(&wire);
    (
        wire,
        batches.map(move |b| b.and_then(|b| to_wire_batch(b, &target))),
    )
}

fn write_parquet(
    path: &Path,
    schema: SchemaRef,
    batches: impl Iterator<Item = Result<RecordBatch, ArrowError>>,
) -> Result<(), GenerateError> {
    let (schema, batches) = plain(&schema, batches);
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(64 * 1024))
        .build();
    let mut writer = ArrowWriter::try_new(File::create(path)?, schema, Some(properties))?;
    for batch in batches {
        writer.write(&batch?)?;
    }
    writer.close()?;
    Ok(())
}

fn write_csv(
    path: &Path,
    schema: SchemaRef,
    batches: impl Iterator<Item = Result<RecordBatch, ArrowError>>,
) -> Result<(), GenerateError> {
    let (_, batches) = plain(&schema, batches);
    let mut writer = arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(File::create(path)?);
    for batch in batches {
        writer.write(&batch?)?;
    }
    Ok(())
}

fn write_json(
    path: &Path,
    schema: SchemaRef,
    batches: impl Iterator<Item = Result<RecordBatch, ArrowError>>,
) -> Result<(), GenerateError> {
    let (_, batches) = plain(&schema, batches);
    let mut writer = arrow::json::LineDelimitedWriter::new(File::create(path)?);
    for batch in batches {
        writer.write(&batch?)?;
    }
    writer.finish()?;
    Ok(())
}

fn write_arrow(
    path: &Path,
    schema: SchemaRef,
    batches: impl Iterator<Item = Result<RecordBatch, ArrowError>>,
) -> Result<(), GenerateError> {
    let (schema, batches) = plain(&schema, batches);
    let mut writer = arrow::ipc::writer::FileWriter::try_new(File::create(path)?, &schema)?;
    for batch in batches {
        writer.write(&batch?)?;
    }
    writer.finish()?;
    Ok(())
}
