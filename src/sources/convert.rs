//! Source values into the Arrow types a plan expects.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::util::display::FormatOptions;

/// `columns`, by position, as a batch of `schema`: each column is cast to
/// the type the plan expects (a source's `numeric` sum to the plan's
/// decimal, its `bigint` count to Int64, text to a date). A value that does
/// not convert is an error, never a silent NULL.
pub(crate) fn conform(
    schema: &SchemaRef,
    columns: Vec<ArrayRef>,
    rows: usize,
) -> Result<RecordBatch, ArrowError> {
    if columns.len() != schema.fields().len() {
        return Err(ArrowError::SchemaError(format!(
            "the source returned {} columns where {} were expected",
            columns.len(),
            schema.fields().len()
        )));
    }
    let options = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    let columns = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(column)
            } else {
                cast_with_options(&column, field.data_type(), &options).map_err(|e| {
                    ArrowError::CastError(format!(
                        "column `{}`: the source's {} does not convert to {}: {e}",
                        field.name(),
                        column.data_type(),
                        field.data_type()
                    ))
                })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(|e| ArrowError::SchemaError(format!("the source's rows do not fit the plan: {e}")))
}

/// Rows per batch read from a row-oriented source.
pub(crate) const BATCH_ROWS: usize = 8192;
