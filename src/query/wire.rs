//! The wire schema: the Arrow types sent to clients. Types that common Flight
//! SQL clients cannot read (view types, dictionaries, Float16, run-end
//! encoding) are converted at this boundary, and metadata is stripped, so the
//! schema in FlightInfo equals the schema of every streamed batch.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use arrow::error::ArrowError;

/// The type a value of `data_type` has on the wire.
pub fn wire_type(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::Float16 => DataType::Float32,
        DataType::Dictionary(_, value) => wire_type(value),
        DataType::RunEndEncoded(_, values) => wire_type(values.data_type()),
        DataType::ListView(field) | DataType::List(field) => DataType::List(wire_field(field)),
        DataType::LargeListView(field) | DataType::LargeList(field) => {
            DataType::LargeList(wire_field(field))
        }
        DataType::FixedSizeList(field, size) => DataType::FixedSizeList(wire_field(field), *size),
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(wire_field).collect::<Fields>())
        }
        DataType::Map(field, sorted) => DataType::Map(wire_field(field), *sorted),
        other => other.clone(),
    }
}

fn wire_field(field: &FieldRef) -> FieldRef {
    Arc::new(Field::new(
        field.name(),
        wire_type(field.data_type()),
        field.is_nullable(),
    ))
}

/// The wire form of a schema: wire types, no field or schema metadata.
pub fn wire_schema(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema.fields().iter().map(wire_field).collect::<Fields>(),
    ))
}

/// Converts a batch to `schema`, casting columns whose type differs.
pub fn to_wire_batch(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema_ref() == schema {
        return Ok(batch);
    }
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(Arc::clone(column))
            } else {
                cast_with_options(column, field.data_type(), &options)
            }
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{DictionaryArray, StringViewArray};
    use arrow::datatypes::Int32Type;

    #[test]
    fn view_and_dictionary_types_become_plain() {
        let schema = Schema::new(vec![
            Field::new("s", DataType::Utf8View, true),
            Field::new(
                "d",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                false,
            ),
            Field::new(
                "l",
                DataType::List(Arc::new(Field::new("item", DataType::BinaryView, true))),
                true,
            ),
        ]);
        let wire = wire_schema(&schema);
        assert_eq!(wire.field(0).data_type(), &DataType::Utf8);
        assert_eq!(wire.field(1).data_type(), &DataType::Utf8);
        assert!(!wire.field(1).is_nullable());
        assert_eq!(
            wire.field(2).data_type(),
            &DataType::List(Arc::new(Field::new("item", DataType::Binary, true)))
        );
    }

    #[test]
    fn batches_are_cast_to_the_wire_schema() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8View, true),
            Field::new(
                "d",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                true,
            ),
        ]));
        let dictionary: DictionaryArray<Int32Type> = vec!["a", "b", "a"].into_iter().collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringViewArray::from(vec!["x", "y", "z"])),
                Arc::new(dictionary),
            ],
        )
        .unwrap();
        let wire = wire_schema(&schema);
        let converted = to_wire_batch(batch, &wire).unwrap();
        assert_eq!(converted.schema(), wire);
        let formatted = arrow::util::pretty::pretty_format_batches(&[converted])
            .unwrap()
            .to_string();
        assert!(formatted.contains("| y | b |"), "{formatted}");
    }
}
