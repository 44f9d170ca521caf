//! The embedded demo mesh: three domains over a TPC-H-derived dataset in four
//! file formats, generated on first start so that `meshgate serve` needs no
//! external server.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
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

/// Generates the demo data under `dir/data` unless it is already there at
/// this scale. Returns whether it generated anything.
pub fn ensure_demo_data(dir: &Path, scale: f64) -> Result<bool, String> {
    let data = dir.join("data");
    let marker = data.join(format!(".complete-sf{scale}"));
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
}

fn generate(data: &Path, scale: f64) -> Result<(), GenerateError> {
    for domain in ["sales", "crm", "supply"] {
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
    // crm: customers in Parquet, the small reference tables in CSV.
    write_parquet(
        &data.join("crm/customer.parquet"),
        CustomerArrow::schema_ref(),
        CustomerArrow::new(CustomerGenerator::new(scale, 1, 1)),
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
    Ok(())
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
