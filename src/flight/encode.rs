//! Record batches as Flight data: a schema message, then each batch as one
//! or more record-batch messages of at most [`MAX_MESSAGE_BYTES`] of Arrow
//! buffers (under the size gRPC clients accept by default).
//!
//! A message's body is kept as the Arrow buffers it is made of, shared with
//! the batch rather than copied into one buffer, with the IPC padding
//! between them: the DoGet response writes them to the connection as they
//! are (see `do_get`). Where one contiguous body is needed, as in a
//! [`FlightData`], the buffers are joined.

use std::collections::VecDeque;

use arrow::array::{ArrayData, ArrayRef, AsArray, RecordBatch};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Schema};
use arrow::error::ArrowError;
use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions, StreamEncoder};
use arrow_flight::FlightData;
use bytes::{Bytes, BytesMut};

/// Arrow buffer bytes per message before a batch is split by rows: under
/// the 4 MiB gRPC clients (grpc-go, tonic, grpc-java) accept by default,
/// with room for the IPC header and padding. Fewer, larger messages cost
/// the ADBC client less.
pub(super) const MAX_MESSAGE_BYTES: usize = 7 * 512 * 1024;

/// A Flight message: its IPC header, app metadata, and body.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub(super) header: Bytes,
    pub(super) app_metadata: Bytes,
    /// The body, in pieces laid end to end.
    pub(super) body: Vec<Bytes>,
}

impl Message {
    pub(super) fn body_len(&self) -> usize {
        self.body.iter().map(Bytes::len).sum()
    }
}

impl From<FlightData> for Message {
    fn from(data: FlightData) -> Self {
        Self {
            header: data.data_header,
            app_metadata: data.app_metadata,
            body: vec![data.data_body],
        }
    }
}

impl From<Message> for FlightData {
    fn from(message: Message) -> Self {
        let data_body = match <[Bytes; 1]>::try_from(message.body) {
            Ok([body]) => body,
            Err(pieces) => {
                let mut body = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
                for piece in pieces {
                    body.extend_from_slice(&piece);
                }
                body.freeze()
            }
        };
        FlightData {
            data_header: message.header,
            app_metadata: message.app_metadata,
            data_body,
            ..Default::default()
        }
    }
}

/// The IPC state of one Flight stream.
pub(super) struct FlightEncoder {
    /// Encodes batches (and their dictionaries) as IPC stream messages whose
    /// bodies share the batches' buffers.
    stream: StreamEncoder,
}

impl FlightEncoder {
    pub(super) fn new(schema: &Schema) -> Result<Self, ArrowError> {
        Ok(Self {
            stream: StreamEncoder::try_new(schema)?,
        })
    }

    /// The stream's first message.
    pub(super) fn schema(&self, schema: &Schema, app_metadata: Option<Bytes>) -> Message {
        let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
            schema,
            &mut DictionaryTracker::new(false),
            &IpcWriteOptions::default(),
        );
        Message {
            header: encoded.ipc_message.into(),
            app_metadata: app_metadata.unwrap_or_default(),
            body: Vec::new(),
        }
    }

    /// The messages carrying `batch` (its dictionaries first, if any).
    pub(super) fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<Message>, ArrowError> {
        let mut messages = Vec::new();
        for part in split(batch) {
            let mut pieces = Pieces::from(self.stream.encode(&part)?);
            while let Some(message) = pieces.next_message()? {
                messages.push(message);
            }
        }
        Ok(messages)
    }
}

/// The buffers of an IPC stream, read message by message.
struct Pieces {
    buffers: VecDeque<Buffer>,
}

impl From<Vec<Buffer>> for Pieces {
    fn from(buffers: Vec<Buffer>) -> Self {
        Self {
            buffers: buffers.into(),
        }
    }
}

impl Pieces {
    /// The next record batch or dictionary message; none at the end. The
    /// stream's schema message, which the encoder writes before its first
    /// batch, is skipped: the Flight stream sends its own.
    fn next_message(&mut self) -> Result<Option<Message>, ArrowError> {
        loop {
            if self.buffers.iter().all(|b| b.is_empty()) {
                return Ok(None);
            }
            let prefix = join(&self.take(8)?);
            // A continuation marker, then the metadata's length.
            let length = match prefix.as_ref() {
                [0xff, 0xff, 0xff, 0xff, a, b, c, d] => i32::from_le_bytes([*a, *b, *c, *d]),
                _ => return Err(malformed("a message without its continuation marker")),
            };
            if length == 0 {
                return Ok(None);
            }
            let length = usize::try_from(length).map_err(|_| malformed("a negative length"))?;
            let header = join(&self.take(length)?);
            let message = arrow::ipc::root_as_message(&header)
                .map_err(|e| malformed(&format!("a header that does not parse: {e}")))?;
            let body_len = usize::try_from(message.bodyLength())
                .map_err(|_| malformed("a negative body length"))?;
            let kind = message.header_type();
            let body = self.take(body_len)?;
            if kind == arrow::ipc::MessageHeader::Schema {
                continue;
            }
            return Ok(Some(Message {
                header,
                app_metadata: Bytes::new(),
                body: body
                    .into_iter()
                    .map(|b| Bytes::from_owner(Shared(b)))
                    .collect(),
            }));
        }
    }

    /// The next `length` bytes, as pieces of the buffers.
    fn take(&mut self, mut length: usize) -> Result<Vec<Buffer>, ArrowError> {
        let mut taken = Vec::new();
        while length > 0 {
            let Some(front) = self.buffers.pop_front() else {
                return Err(malformed("a message longer than the stream"));
            };
            if front.len() <= length {
                length -= front.len();
                taken.push(front);
            } else {
                taken.push(front.slice_with_length(0, length));
                self.buffers.push_front(front.slice(length));
                length = 0;
            }
        }
        Ok(taken)
    }
}

fn malformed(what: &str) -> ArrowError {
    ArrowError::IpcError(format!("the IPC encoder wrote {what}"))
}

/// `buffers` copied into one.
fn join(buffers: &[Buffer]) -> Bytes {
    let mut joined = BytesMut::with_capacity(buffers.iter().map(|b| b.len()).sum());
    for buffer in buffers {
        joined.extend_from_slice(buffer);
    }
    joined.freeze()
}

/// An Arrow buffer lent to a [`Bytes`].
struct Shared(Buffer);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// `batch` cut by rows into parts whose buffers hold about the same
/// number of bytes, none more than [`MAX_MESSAGE_BYTES`] (but for a row
/// larger than that, which is a part of its own); none for an empty batch.
/// Strings and binaries are counted where they lie, so that a few long
/// values among many short ones cannot make one part many times the limit.
fn split(batch: &RecordBatch) -> Vec<RecordBatch> {
    let rows = batch.num_rows();
    if rows == 0 {
        // An empty result is its schema message alone.
        return Vec::new();
    }
    let sizes = RowBytes::of(batch);
    let total = sizes.before(rows);
    // What is left of a message for the rows once each of its many columns
    // has taken its share.
    let limit = MAX_MESSAGE_BYTES
        .saturating_sub(sizes.per_message)
        .max(MAX_MESSAGE_BYTES / 16);
    if total <= limit || rows == 1 {
        return vec![batch.clone()];
    }
    let mut cut = Vec::new();
    let mut start = 0;
    while start < rows {
        // An even share of what is left among as few parts as the limit
        // allows, which is never more than the limit.
        let taken = sizes.before(start);
        let left = total - taken;
        let share = left.div_ceil(left.div_ceil(limit).max(1));
        let end = sizes.last_end_within(start, taken + share).max(start + 1);
        cut.push(batch.slice(start, end - start));
        start = end;
    }
    cut
}

/// The bytes a batch's rows take in a message, row by row.
struct RowBytes<'a> {
    /// What the columns of fixed width (and, evenly spread, nested columns)
    /// hold for all the rows.
    spread: usize,
    rows: usize,
    /// What a message of these columns takes whatever rows it carries: in
    /// its header a node for each array and a locator for each buffer, and
    /// in its body each buffer padded to 64 bytes.
    per_message: usize,
    /// The offsets of the string and binary columns.
    offsets: Vec<Offsets<'a>>,
}

enum Offsets<'a> {
    Small(&'a [i32]),
    Large(&'a [i64]),
}

impl<'a> Offsets<'a> {
    fn of(column: &'a ArrayRef) -> Option<Self> {
        Some(match column.data_type() {
            DataType::Utf8 => Self::Small(column.as_string::<i32>().value_offsets()),
            DataType::Binary => Self::Small(column.as_binary::<i32>().value_offsets()),
            DataType::LargeUtf8 => Self::Large(column.as_string::<i64>().value_offsets()),
            DataType::LargeBinary => Self::Large(column.as_binary::<i64>().value_offsets()),
            _ => return None,
        })
    }

    /// Bytes an offset takes.
    fn width(&self) -> usize {
        match self {
            Self::Small(_) => 4,
            Self::Large(_) => 8,
        }
    }

    /// Bytes of the values before `row`.
    fn before(&self, row: usize) -> usize {
        match self {
            Self::Small(o) => (o[row] - o[0]) as usize,
            Self::Large(o) => (o[row] - o[0]) as usize,
        }
    }
}

impl<'a> RowBytes<'a> {
    fn of(batch: &'a RecordBatch) -> Self {
        fn per_message(data: &ArrayData) -> usize {
            // The buffers, and the validity bitmap the IPC format gives each
            // array.
            let buffers = data.buffers().len() + 1;
            16 + buffers * (16 + 63) + data.child_data().iter().map(per_message).sum::<usize>()
        }
        let rows = batch.num_rows();
        let (mut spread, mut per_message_bytes) = (0, 0);
        let mut offsets = Vec::new();
        for column in batch.columns() {
            let data = column.to_data();
            per_message_bytes += per_message(&data);
            match Offsets::of(column) {
                Some(own) => {
                    let nulls = column.nulls().map_or(0, |n| n.len().div_ceil(8));
                    spread += own.width() * rows + nulls;
                    offsets.push(own);
                }
                // What the rows hold, not the buffers a slice shares with
                // others.
                None => {
                    spread += data
                        .get_slice_memory_size()
                        .unwrap_or_else(|_| column.get_buffer_memory_size())
                }
            }
        }
        Self {
            spread,
            rows,
            per_message: per_message_bytes,
            offsets,
        }
    }

    /// The bytes of the rows before `row`.
    fn before(&self, row: usize) -> usize {
        let spread = (self.spread as u128 * row as u128 / self.rows.max(1) as u128) as usize;
        let values: usize = self.offsets.iter().map(|o| o.before(row)).sum();
        spread + values
    }

    /// The last row boundary after `start` up to which the rows take at
    /// most `limit` bytes; `start` if the next row alone goes past it.
    fn last_end_within(&self, start: usize, limit: usize) -> usize {
        // The first boundary past the limit, by bisection: bytes only grow
        // with the rows.
        let (mut low, mut high) = (start + 1, self.rows + 1);
        while low < high {
            let middle = low + (high - low) / 2;
            if self.before(middle) <= limit {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        low - 1
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, DictionaryArray, Int32Array, Int64Array, StringArray};
    use arrow::datatypes::Int32Type;
    use arrow_flight::utils::flight_data_to_arrow_batch;

    use super::*;

    fn decode(schema_message: Message, messages: &[Message]) -> Vec<RecordBatch> {
        let schema_message = FlightData::from(schema_message);
        let messages: Vec<FlightData> = messages.iter().cloned().map(FlightData::from).collect();
        let schema = Arc::new(Schema::try_from(&schema_message).unwrap());
        let mut dictionaries = std::collections::HashMap::new();
        let mut batches = Vec::new();
        for message in &messages {
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

    /// `batch` on a stream of its own: the schema message, then the
    /// batch's messages.
    fn encode_alone(batch: &RecordBatch) -> (Message, Vec<Message>) {
        let mut encoder = FlightEncoder::new(&batch.schema()).unwrap();
        let schema_message = encoder.schema(&batch.schema(), None);
        let messages = encoder.batch(batch).unwrap();
        (schema_message, messages)
    }

    /// The rows of `messages`, decoded and joined into one batch.
    fn decode_whole(schema_message: Message, messages: &[Message]) -> RecordBatch {
        let decoded = decode(schema_message, messages);
        let schema = decoded[0].schema();
        arrow::compute::concat_batches(&schema, &decoded).unwrap()
    }

    #[test]
    fn a_large_batch_is_split_and_every_message_decodes_to_its_rows() {
        let rows = 300_000;
        let numbers: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows));
        let words: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("value {i}")),
        ));
        let batch = RecordBatch::try_from_iter([("n", numbers), ("w", words)]).unwrap();
        let mut encoder = FlightEncoder::new(&batch.schema()).unwrap();
        let schema_message = encoder.schema(&batch.schema(), Some(Bytes::from_static(b"note")));
        assert_eq!(schema_message.app_metadata.as_ref(), b"note");
        // Twice: the encoder's state carries over from batch to batch.
        for _ in 0..2 {
            let messages = encoder.batch(&batch).unwrap();
            assert!(messages.len() > 1, "{} messages", messages.len());
            for message in &messages {
                assert!(message.body_len() <= MAX_MESSAGE_BYTES + 1024);
            }
            let decoded = decode(schema_message.clone(), &messages);
            let whole = arrow::compute::concat_batches(&batch.schema(), &decoded).unwrap();
            assert_eq!(whole, batch);
        }
        let sliced = batch.slice(123, 7);
        let messages = encoder.batch(&sliced).unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(decode(schema_message.clone(), &messages), vec![sliced]);
        // An empty batch sends nothing: the schema message carries an
        // empty result.
        assert!(encoder.batch(&batch.slice(0, 0)).unwrap().is_empty());
    }

    #[test]
    fn a_few_long_values_among_many_short_ones_do_not_make_a_message_past_the_limit() {
        // Ten values of a mebibyte each at the front of 200 000 short ones:
        // cut into parts of equal rows, the first part would hold all ten.
        let long = "x".repeat(1024 * 1024);
        let words: ArrayRef = Arc::new(StringArray::from_iter_values((0..200_000).map(|i| {
            if i < 10 {
                long.clone()
            } else {
                format!("w{i}")
            }
        })));
        let numbers: ArrayRef = Arc::new(Int64Array::from_iter_values(0..200_000));
        let batch = RecordBatch::try_from_iter([("w", words), ("n", numbers)]).unwrap();
        let (schema_message, messages) = encode_alone(&batch);
        for message in &messages {
            assert!(
                message.body_len() <= MAX_MESSAGE_BYTES + 1024,
                "a message of {} bytes",
                message.body_len()
            );
        }
        // No more messages than the limit calls for, and one for the rows'
        // edges.
        let total: usize = messages.iter().map(Message::body_len).sum();
        assert!(
            messages.len() <= total.div_ceil(MAX_MESSAGE_BYTES) + 1,
            "{} messages of {total} bytes",
            messages.len()
        );
        assert_eq!(decode_whole(schema_message, &messages), batch);
    }

    #[test]
    fn a_row_larger_than_the_limit_is_a_message_of_its_own() {
        let huge = "y".repeat(MAX_MESSAGE_BYTES + 1);
        let words: ArrayRef = Arc::new(StringArray::from_iter_values(["a", &huge, "b", "c"]));
        let batch = RecordBatch::try_from_iter([("w", words)]).unwrap();
        let (schema_message, messages) = encode_alone(&batch);
        let decoded = decode(schema_message.clone(), &messages);
        let alone: Vec<usize> = decoded
            .iter()
            .filter(|part| {
                part.column(0)
                    .as_string::<i32>()
                    .iter()
                    .any(|v| v == Some(huge.as_str()))
            })
            .map(RecordBatch::num_rows)
            .collect();
        assert_eq!(alone, [1]);
        assert_eq!(decode_whole(schema_message, &messages), batch);
    }

    #[test]
    fn a_message_of_thousands_of_columns_stays_under_what_clients_accept() {
        // Each column's header entries and padding add to every message:
        // 8 000 nullable columns in messages of 3.5 MiB of rows would pass
        // the 4 MiB gRPC clients accept by default.
        let rows = 2_000;
        let columns: Vec<(String, ArrayRef)> = (0..8_000)
            .map(|c| {
                let values =
                    Int32Array::from_iter((0..rows).map(|r| (r % 7 != c % 7).then_some(r)));
                (format!("c{c}"), Arc::new(values) as ArrayRef)
            })
            .collect();
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let (schema_message, messages) = encode_alone(&batch);
        assert!(messages.len() > 1, "{} messages", messages.len());
        for message in &messages {
            let size = message.header.len() + message.body_len();
            assert!(size < 4 * 1024 * 1024 - 1024, "a message of {size} bytes");
        }
        assert_eq!(decode_whole(schema_message, &messages), batch);
    }

    #[test]
    fn dictionaries_are_sent_before_the_batches_that_use_them() {
        let keys: DictionaryArray<Int32Type> = vec!["a", "b", "a"].into_iter().collect();
        let batch = RecordBatch::try_from_iter([("d", Arc::new(keys) as ArrayRef)]).unwrap();
        let (schema_message, messages) = encode_alone(&batch);
        assert_eq!(messages.len(), 2);
        assert_eq!(decode(schema_message, &messages), vec![batch]);
    }

    #[test]
    fn a_message_body_shares_the_batch_buffers_it_is_made_of() {
        let rows = 50_000;
        let numbers = Int64Array::from_iter_values(0..rows);
        let words = StringArray::from_iter_values((0..rows).map(|i| format!("w{}", i % 7)));
        let flags = arrow::array::BooleanArray::from_iter((0..rows).map(|i| Some(i % 3 == 0)));
        let values = numbers.values().inner().as_ptr();
        let batch = RecordBatch::try_from_iter([
            ("n", Arc::new(numbers) as ArrayRef),
            ("w", Arc::new(words) as ArrayRef),
            ("f", Arc::new(flags) as ArrayRef),
        ])
        .unwrap();
        let (schema_message, messages) = encode_alone(&batch);
        assert_eq!(messages.len(), 1);
        // The 400 kB of numbers are a piece of the body as they are.
        assert!(
            messages[0]
                .body
                .iter()
                .any(|piece| piece.as_ptr() == values),
            "{:?}",
            messages[0].body.iter().map(Bytes::len).collect::<Vec<_>>()
        );
        assert_eq!(decode(schema_message, &messages), vec![batch]);
    }
}
