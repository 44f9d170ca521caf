//! The wire schema: the Arrow types sent to clients. Types that common Flight
//! SQL clients cannot read (view types, dictionaries, Float16, run-end
//! encoding) are converted at this boundary, and metadata is stripped, so the
//! schema in FlightInfo equals the schema of every streamed batch.

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, ByteView, RecordBatch, RecordBatchOptions, StringArray,
};
use arrow::buffer::{Buffer, MutableBuffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use arrow::error::ArrowError;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DataFusionResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::StreamExt;

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
            match (column.data_type(), field.data_type()) {
                (from, to) if from == to => Ok(Arc::clone(column)),
                (DataType::Utf8View, DataType::Utf8) => {
                    let views = column.as_string_view();
                    let (offsets, values) =
                        concatenate_views(views.views(), views.data_buffers(), views.nulls())?;
                    // SAFETY: each view of a StringViewArray is valid UTF-8,
                    // so their concatenation is, and every offset falls
                    // between two values.
                    Ok(Arc::new(unsafe {
                        StringArray::new_unchecked(offsets, values, views.nulls().cloned())
                    }) as ArrayRef)
                }
                (DataType::BinaryView, DataType::Binary) => {
                    let views = column.as_binary_view();
                    let (offsets, values) =
                        concatenate_views(views.views(), views.data_buffers(), views.nulls())?;
                    Ok(Arc::new(BinaryArray::try_new(
                        offsets,
                        values,
                        views.nulls().cloned(),
                    )?) as ArrayRef)
                }
                (_, to) => cast_with_options(column, to, &options),
            }
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}

/// Bytes written past a value's end at most, in fixed-size copies.
const SLACK: usize = 32;

/// The values of a view array laid end to end, with their offsets: what a
/// string or binary array holds. A null's value is empty.
fn concatenate_views(
    views: &[u128],
    buffers: &[Buffer],
    nulls: Option<&NullBuffer>,
) -> Result<(OffsetBuffer<i32>, Buffer), ArrowError> {
    let length = |index: usize, view: u128| -> usize {
        if nulls.is_some_and(|nulls| nulls.is_null(index)) {
            0
        } else {
            // The low 32 bits of a view are its value's length.
            (view as u32) as usize
        }
    };
    let total: usize = views
        .iter()
        .enumerate()
        .map(|(index, &view)| length(index, view))
        .sum();
    if i32::try_from(total).is_err() {
        return Err(ArrowError::ComputeError(format!(
            "a batch holds {total} bytes of strings, more than a Utf8 column can"
        )));
    }
    let mut offsets = Vec::with_capacity(views.len() + 1);
    offsets.push(0_i32);
    // Room past the end for the fixed-size copies below.
    let mut values = MutableBuffer::with_capacity(total + SLACK);
    let out = values.as_mut_ptr();
    let mut end = 0_usize;
    for (index, &view) in views.iter().enumerate() {
        let len = length(index, view);
        if len == 0 {
            offsets.push(end as i32);
            continue;
        }
        if len <= 12 {
            // Short values are inline, after the length: all 16 bytes of
            // the view shifted down are stored at once (a fixed-size store
            // is cheaper than a sized copy), and the end moves on by the
            // value's length.
            let inline = (view >> 32).to_le_bytes();
            // SAFETY: `end + len <= total` (the lengths add up to `total`),
            // so the 16 bytes written at `end` lie within the capacity of
            // `total + SLACK` bytes.
            unsafe { std::ptr::copy_nonoverlapping(inline.as_ptr(), out.add(end), 16) };
        } else {
            let view = ByteView::from(view);
            let start = view.offset as usize;
            let buffer = buffers
                .get(view.buffer_index as usize)
                .filter(|buffer| start.checked_add(len).is_some_and(|e| e <= buffer.len()))
                .ok_or_else(|| {
                    ArrowError::ComputeError("a view points outside its buffers".into())
                })?;
            // A value of up to `SLACK` bytes is copied as `SLACK` bytes when
            // its buffer holds that many from its start: one fixed-size copy.
            let copied = if len <= SLACK && start + SLACK <= buffer.len() {
                SLACK
            } else {
                len
            };
            // SAFETY: `start + copied <= buffer.len()` (checked above), and
            // `end + copied <= total + SLACK` since `end + len <= total`
            // and `copied` exceeds `len` only when at most `SLACK`.
            unsafe {
                std::ptr::copy_nonoverlapping(buffer.as_ptr().add(start), out.add(end), copied)
            };
        }
        end += len;
        // `end` is at most `total`, which fits an i32.
        offsets.push(end as i32);
    }
    // SAFETY: the values' bytes were written up to `end`, which equals
    // `total`, within the capacity.
    unsafe { values.set_len(end) };
    Ok((
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        values.into(),
    ))
}

/// `plan`, run so that its rows are converted to `schema` (see
/// [`to_wire_batch`]) in each of its partitions where it has several, before
/// they are merged into the one stream sent to the client: the conversion
/// (copying every string out of its views) then runs on every core, beside
/// the scans, rather than on the one task that sends.
pub(crate) fn converted_in_partitions(
    plan: Arc<dyn ExecutionPlan>,
    schema: &SchemaRef,
) -> Arc<dyn ExecutionPlan> {
    // Types to convert, column by column (a plan of other columns is left
    // to fail where its batches are sent).
    let fields = plan.schema().fields().clone();
    let converts = fields.len() == schema.fields().len()
        && fields
            .iter()
            .zip(schema.fields())
            .any(|(from, to)| from.data_type() != to.data_type());
    if !converts {
        return plan;
    }
    if plan.output_partitioning().partition_count() > 1 {
        return Arc::new(CoalescePartitionsExec::new(ToWire::over(plan, schema)));
    }
    match plan.downcast_ref::<CoalescePartitionsExec>() {
        Some(merge) if merge.input().output_partitioning().partition_count() > 1 => Arc::new(
            CoalescePartitionsExec::new(ToWire::over(Arc::clone(merge.input()), schema))
                .with_fetch(merge.fetch()),
        ),
        _ => plan,
    }
}

/// Converts each partition's batches to the wire schema.
#[derive(Debug)]
struct ToWire {
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl ToWire {
    fn over(input: Arc<dyn ExecutionPlan>, schema: &SchemaRef) -> Arc<dyn ExecutionPlan> {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(schema)),
            input.output_partitioning().clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        );
        Arc::new(Self {
            input,
            schema: Arc::clone(schema),
            properties: Arc::new(properties),
        })
    }
}

impl DisplayAs for ToWire {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ToWire")
    }
}

impl ExecutionPlan for ToWire {
    fn name(&self) -> &str {
        "ToWire"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DataFusionResult<TreeNodeRecursion>,
    ) -> DataFusionResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DataFusionResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "ToWire takes exactly one input".into(),
            ));
        }
        Ok(Self::over(children.swap_remove(0), &self.schema))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DataFusionResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let schema = Arc::clone(&self.schema);
        let stream = input.map(move |batch| {
            batch.and_then(|batch| {
                to_wire_batch(batch, &schema)
                    .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))
            })
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        )))
    }
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

    #[test]
    fn a_value_at_the_end_of_its_buffer_is_copied_without_reading_past_it() {
        // Values of 13 to 40 bytes, each alone in its buffer (so the bytes
        // after it are not there to copy) or followed by others.
        for len in 13..=40 {
            let value = "v".repeat(len);
            for others in [0, 1, 3] {
                let values: Vec<String> = std::iter::once(value.clone())
                    .chain((0..others).map(|i| format!("{value}{i}")))
                    .collect();
                let strings = StringViewArray::from_iter_values(values.iter().rev());
                let schema = Arc::new(Schema::new(vec![Field::new(
                    "s",
                    DataType::Utf8View,
                    false,
                )]));
                let batch =
                    RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(strings.clone())])
                        .unwrap();
                let converted = to_wire_batch(batch, &wire_schema(&schema)).unwrap();
                let expected = arrow::compute::cast(&strings, &DataType::Utf8).unwrap();
                assert_eq!(
                    converted.column(0).as_ref(),
                    expected.as_ref(),
                    "{len} {others}"
                );
                converted.column(0).to_data().validate_full().unwrap();
            }
        }
    }

    #[test]
    fn views_become_plain_arrays_equal_to_a_cast() {
        use arrow::array::BinaryViewArray;
        let long = "a value longer than twelve bytes, held in a data buffer";
        // Nulls, empty values, inline values (12 bytes at most) and values
        // held in data buffers: of 13 to 112 bytes, and of 55, 110, 165 and
        // 220.
        let values: Vec<Option<String>> = (0..3000)
            .map(|i| match i % 6 {
                0 => None,
                1 => Some(String::new()),
                2 => Some(format!("short{}", i % 97)),
                3 => Some(format!("{long} #{i} {long}")[..13 + i % 100].to_string()),
                4 => Some(long.repeat(1 + i % 4)),
                _ => Some("twelve bytes".to_string()),
            })
            .collect();
        let strings = StringViewArray::from_iter(values.iter().map(|v| v.as_deref()));
        // A slice, so views start mid-array.
        let strings = strings.slice(7, 2500);
        let binaries =
            BinaryViewArray::from_iter(values.iter().map(|v| v.as_deref().map(str::as_bytes)));
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8View, true),
            Field::new("b", DataType::BinaryView, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(strings.clone()), Arc::new(binaries.slice(7, 2500))],
        )
        .unwrap();
        let converted = to_wire_batch(batch, &wire_schema(&schema)).unwrap();
        let expected_strings = arrow::compute::cast(&strings, &DataType::Utf8).unwrap();
        assert_eq!(converted.column(0).as_ref(), expected_strings.as_ref());
        let expected_binaries =
            arrow::compute::cast(&binaries.slice(7, 2500), &DataType::Binary).unwrap();
        assert_eq!(converted.column(1).as_ref(), expected_binaries.as_ref());
        assert_eq!(
            converted.column(0).null_count(),
            (7..2507).filter(|i| i % 6 == 0).count()
        );
        converted.column(0).to_data().validate_full().unwrap();
    }

    #[tokio::test]
    async fn each_partition_converts_its_own_rows_before_they_are_merged() {
        use datafusion::datasource::memory::MemorySourceConfig;
        use datafusion::physical_plan::collect;
        use datafusion::prelude::SessionContext;

        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("s", DataType::Utf8View, true),
        ]));
        let batch = |ids: Vec<i64>| {
            let strings: Vec<Option<String>> = ids
                .iter()
                .map(|id| (id % 3 != 0).then(|| format!("value {id} of more than twelve bytes")))
                .collect();
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(arrow::array::Int64Array::from(ids)),
                    Arc::new(StringViewArray::from_iter(strings)),
                ],
            )
            .unwrap()
        };
        let partitions = vec![vec![batch(vec![1, 2, 3])], vec![batch(vec![4, 5, 6, 7])]];
        let wire = wire_schema(&schema);
        let context = SessionContext::new().task_ctx();

        let scan =
            MemorySourceConfig::try_new_exec(&partitions, Arc::clone(&schema), None).unwrap();
        let plan = converted_in_partitions(scan, &wire);
        assert_eq!(plan.name(), "CoalescePartitionsExec");
        assert_eq!(plan.children()[0].name(), "ToWire");
        assert_eq!(plan.schema(), wire);
        let mut rows: Vec<(i64, Option<String>)> = Vec::new();
        for batch in collect(plan, Arc::clone(&context)).await.unwrap() {
            assert_eq!(batch.schema(), wire);
            let ids = batch
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>();
            let strings = batch.column(1).as_string::<i32>();
            for row in 0..batch.num_rows() {
                rows.push((
                    ids.value(row),
                    strings
                        .is_valid(row)
                        .then(|| strings.value(row).to_string()),
                ));
            }
        }
        rows.sort();
        let expected: Vec<(i64, Option<String>)> = (1..=7)
            .map(|id| {
                (
                    id,
                    (id % 3 != 0).then(|| format!("value {id} of more than twelve bytes")),
                )
            })
            .collect();
        assert_eq!(rows, expected);

        // Merged already: the conversion goes below the merge.
        let scan =
            MemorySourceConfig::try_new_exec(&partitions, Arc::clone(&schema), None).unwrap();
        let merged: Arc<dyn ExecutionPlan> =
            Arc::new(CoalescePartitionsExec::new(scan).with_fetch(Some(5)));
        let plan = converted_in_partitions(merged, &wire);
        assert_eq!(plan.children()[0].name(), "ToWire");
        let fetched: usize = collect(plan, Arc::clone(&context))
            .await
            .unwrap()
            .iter()
            .map(RecordBatch::num_rows)
            .sum();
        assert_eq!(fetched, 5);

        // One partition, or nothing to convert: the plan as it is (the rows
        // are converted as they are sent).
        let single =
            MemorySourceConfig::try_new_exec(&partitions[..1], Arc::clone(&schema), None).unwrap();
        let plan = converted_in_partitions(Arc::clone(&single) as _, &wire);
        assert!(Arc::ptr_eq(&plan, &(single as Arc<dyn ExecutionPlan>)));
        let plain = MemorySourceConfig::try_new_exec(
            &[vec![to_wire_batch(batch(vec![1]), &wire).unwrap()], vec![]],
            Arc::clone(&wire),
            None,
        )
        .unwrap();
        let plan = converted_in_partitions(Arc::clone(&plain) as _, &wire);
        assert!(Arc::ptr_eq(&plan, &(plain as Arc<dyn ExecutionPlan>)));
    }
}
