//! Record batches as Flight data: a schema message, then each batch as one
//! or more record-batch messages of at most [`MAX_MESSAGE_BYTES`] of Arrow
//! buffers (the size gRPC clients accept by default with room to spare).
//!
//! Each message's body is written into a buffer sized like the previous
//! one, so a stream of similar batches copies each buffer once (growing the
//! body buffer as it fills would copy it again).

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::error::ArrowError;
use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};
use arrow_flight::FlightData;
use bytes::Bytes;

/// Arrow buffer bytes per message before a batch is split by rows.
pub(super) const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// The IPC state of one Flight stream.
pub(super) struct FlightEncoder {
    generator: IpcDataGenerator,
    dictionaries: DictionaryTracker,
    options: IpcWriteOptions,
    context: IpcWriteContext,
}

impl FlightEncoder {
    pub(super) fn new() -> Self {
        let mut context = IpcWriteContext::default();
        context.set_reserve_scratch(true);
        Self {
            generator: IpcDataGenerator::default(),
            dictionaries: DictionaryTracker::new(false),
            options: IpcWriteOptions::default(),
            context,
        }
    }

    /// The stream's first message.
    pub(super) fn schema(&mut self, schema: &Schema, app_metadata: Option<Bytes>) -> FlightData {
        let encoded = self.generator.schema_to_bytes_with_dictionary_tracker(
            schema,
            &mut self.dictionaries,
            &self.options,
        );
        let mut message = FlightData::from(encoded);
        if let Some(metadata) = app_metadata {
            message.app_metadata = metadata;
        }
        message
    }

    /// The messages carrying `batch` (its dictionaries first, if any).
    pub(super) fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<FlightData>, ArrowError> {
        let mut messages = Vec::new();
        for part in split(batch) {
            let (dictionaries, data) = self.generator.encode(
                &part,
                &mut self.dictionaries,
                &self.options,
                &mut self.context,
            )?;
            messages.extend(dictionaries.into_iter().map(FlightData::from));
            messages.push(FlightData::from(data));
        }
        Ok(messages)
    }
}

/// `batch` cut by rows into parts of about [`MAX_MESSAGE_BYTES`] or less;
/// none for an empty batch.
fn split(batch: &RecordBatch) -> Vec<RecordBatch> {
    // What the rows hold, not the buffers a slice shares with others.
    let bytes: usize = batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_buffer_memory_size())
        })
        .sum();
    let parts = bytes.div_ceil(MAX_MESSAGE_BYTES).max(1);
    let rows = batch.num_rows();
    if rows == 0 {
        // An empty result is its schema message alone.
        return Vec::new();
    }
    if parts == 1 || rows == 1 {
        return vec![batch.clone()];
    }
    let per_part = rows.div_ceil(parts);
    (0..rows)
        .step_by(per_part)
        .map(|offset| batch.slice(offset, per_part.min(rows - offset)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, DictionaryArray, Int64Array, StringArray};
    use arrow::datatypes::Int32Type;
    use arrow_flight::utils::flight_data_to_arrow_batch;

    use super::*;

    fn decode(schema_message: &FlightData, messages: &[FlightData]) -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::try_from(schema_message).unwrap());
        let mut dictionaries = std::collections::HashMap::new();
        let mut batches = Vec::new();
        for message in messages {
            let header = arrow::ipc::root_as_message(&message.data_header).unwrap();
            if header.header_type() == arrow::ipc::MessageHeader::DictionaryBatch {
                let buffer = arrow::buffer::Buffer::from(message.data_body.to_vec());
                arrow::ipc::reader::read_dictionary(
                    &buffer,
                    header.header_as_dictionary_batch().unwrap(),
                    &schema,
                    &mut dictionaries,
                    &header.version(),
                )
                .unwrap();
            } else {
                batches.push(
                    flight_data_to_arrow_batch(message, Arc::clone(&schema), &dictionaries)
                        .unwrap(),
                );
            }
        }
        batches
    }

    #[test]
    fn a_large_batch_is_split_and_every_message_decodes_to_its_rows() {
        let rows = 300_000;
        let numbers: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows));
        let words: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("value {i}")),
        ));
        let batch = RecordBatch::try_from_iter([("n", numbers), ("w", words)]).unwrap();
        let mut encoder = FlightEncoder::new();
        let schema_message = encoder.schema(&batch.schema(), Some(Bytes::from_static(b"note")));
        assert_eq!(schema_message.app_metadata.as_ref(), b"note");
        // Twice: the second batch is written into the reserved buffer.
        for _ in 0..2 {
            let messages = encoder.batch(&batch).unwrap();
            assert!(messages.len() > 1, "{} messages", messages.len());
            for message in &messages {
                assert!(message.data_body.len() <= MAX_MESSAGE_BYTES + 1024);
            }
            let decoded = decode(&schema_message, &messages);
            let whole = arrow::compute::concat_batches(&batch.schema(), &decoded).unwrap();
            assert_eq!(whole, batch);
        }
        let sliced = batch.slice(123, 7);
        let messages = encoder.batch(&sliced).unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(decode(&schema_message, &messages), vec![sliced]);
        // An empty batch sends nothing: the schema message carries an
        // empty result.
        assert!(encoder.batch(&batch.slice(0, 0)).unwrap().is_empty());
    }

    #[test]
    fn dictionaries_are_sent_before_the_batches_that_use_them() {
        let keys: DictionaryArray<Int32Type> = vec!["a", "b", "a"].into_iter().collect();
        let batch = RecordBatch::try_from_iter([("d", Arc::new(keys) as ArrayRef)]).unwrap();
        let mut encoder = FlightEncoder::new();
        let schema_message = encoder.schema(&batch.schema(), None);
        let messages = encoder.batch(&batch).unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(decode(&schema_message, &messages), vec![batch]);
    }
}
