//! DoGet, answered here rather than through tonic's message encoding.
//!
//! tonic encodes each response message into a buffer of its own: the whole
//! Arrow body of every message would be copied once more on its way out
//! (after the IPC writer had copied it into one body already). Here each
//! message leaves as its gRPC frame head (the length prefix and the
//! protobuf fields of a `FlightData`, body length included) followed by the
//! body's pieces as they are, shared with the record batch (see
//! [`super::encode`]); the gRPC status follows in the trailers.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use arrow_flight::Ticket;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tonic::Status;

use super::encode::Message;
use super::status::ProtocolError;
use super::{MeshFlightService, MessageStream};

/// The largest DoGet request read: a ticket is a statement handle.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// `FlightData` field numbers.
const DATA_HEADER: u32 = 2;
const APP_METADATA: u32 = 3;
const DATA_BODY: u32 = 1000;

/// The response to a DoGet request: the messages of its ticket, or the
/// status it failed with before the first.
pub(super) async fn respond(
    service: &MeshFlightService,
    request: http::Request<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let messages = async {
        let (parts, body) = request.into_parts();
        let ticket = read_ticket(body).await?;
        let request = tonic::Request::from_http(http::Request::from_parts(parts, ticket));
        service.do_get_messages(request).await
    };
    match messages.await {
        Ok(messages) => {
            let mut response =
                http::Response::new(tonic::body::Body::new(MessageBody::new(messages)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(status) => status.into_http(),
    }
}

/// The request's one message: a length-prefixed, uncompressed `Ticket`.
async fn read_ticket(body: tonic::body::Body) -> Result<Ticket, Status> {
    let bytes = http_body_util::Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| bad_request(format!("reading the DoGet request: {e}")))?
        .to_bytes();
    let Some((&[compressed, a, b, c, d], message)) = bytes.split_first_chunk::<5>() else {
        return Err(bad_request("the DoGet request holds no message".into()));
    };
    if compressed != 0 {
        return Err(ProtocolError::Unsupported(
            "compressed requests are not accepted: send the ticket uncompressed".into(),
        )
        .into());
    }
    if u32::from_be_bytes([a, b, c, d]) as usize != message.len() {
        return Err(bad_request(
            "the DoGet request must hold exactly one message, the ticket".into(),
        ));
    }
    <Ticket as prost::Message>::decode(message)
        .map_err(|e| bad_request(format!("the DoGet ticket does not decode: {e}")))
}

fn bad_request(message: String) -> Status {
    ProtocolError::BadRequest(message).into()
}

/// A DoGet response body: each message's frame head and body pieces, then
/// the trailers with the status the stream ended with.
struct MessageBody {
    /// None once the stream has ended.
    messages: Option<MessageStream>,
    /// What is ready to leave, in order.
    pieces: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl MessageBody {
    fn new(messages: MessageStream) -> Self {
        Self {
            messages: Some(messages),
            pieces: VecDeque::new(),
            trailers: None,
        }
    }

    fn end(&mut self, status: &Status) {
        self.messages = None;
        let mut trailers = HeaderMap::new();
        if let Err(unencodable) = status.add_header(&mut trailers) {
            // A message that does not fit a header: the code alone.
            trailers.clear();
            let plain = Status::new(unencodable.code(), "");
            let _ = plain.add_header(&mut trailers);
        }
        self.trailers = Some(trailers);
    }
}

impl http_body::Body for MessageBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(piece) = this.pieces.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            let Some(messages) = this.messages.as_mut() else {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            match ready!(messages.poll_next_unpin(cx)) {
                Some(Ok(message)) => {
                    if let Err(status) = frame(message, &mut this.pieces) {
                        this.end(&status);
                    }
                }
                Some(Err(status)) => this.end(&status),
                None => this.end(&Status::ok("")),
            }
        }
    }
}

/// The payload of one HTTP/2 frame, as the gRPC clients in use accept
/// (the protocol's default): h2 cuts each piece of the body into frames of
/// at most this size, and a piece of any other length would leave a short
/// frame at its end.
const FRAME_BYTES: usize = 16 * 1024;

/// Appends `message` as one gRPC message: a `FlightData` whose body is
/// written as its pieces. The pieces are cut at frame boundaries: the bytes
/// of a piece up to the next boundary, and a piece shorter than a frame,
/// are copied into their neighbours, so every frame but the message's last
/// is full (a frame costs the client about as much as copying a few
/// kilobytes).
fn frame(message: Message, pieces: &mut VecDeque<Bytes>) -> Result<(), Status> {
    let body_len = message.body_len();
    let field = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
    let mut length = 0;
    if !message.header.is_empty() {
        length += field(DATA_HEADER, message.header.len());
    }
    if !message.app_metadata.is_empty() {
        length += field(APP_METADATA, message.app_metadata.len());
    }
    if body_len > 0 {
        length += field(DATA_BODY, body_len);
    }
    let prefixed = u32::try_from(length).map_err(|_| {
        Status::from(ProtocolError::TooLarge(format!(
            "a row of the result takes {length} bytes, more than a gRPC message can hold"
        )))
    })?;
    let mut copied = BytesMut::with_capacity(FRAME_BYTES);
    copied.put_u8(0);
    copied.put_u32(prefixed);
    for (tag, value) in [
        (DATA_HEADER, &message.header),
        (APP_METADATA, &message.app_metadata),
    ] {
        if !value.is_empty() {
            encode_key(tag, WireType::LengthDelimited, &mut copied);
            encode_varint(value.len() as u64, &mut copied);
            copied.put_slice(value);
        }
    }
    if body_len > 0 {
        encode_key(DATA_BODY, WireType::LengthDelimited, &mut copied);
        encode_varint(body_len as u64, &mut copied);
    }
    for piece in message.body {
        // What `copied` lacks to end on a frame boundary.
        let short = (FRAME_BYTES - copied.len() % FRAME_BYTES) % FRAME_BYTES;
        if piece.len() < short + FRAME_BYTES {
            copied.extend_from_slice(&piece);
            continue;
        }
        copied.extend_from_slice(&piece[..short]);
        pieces.push_back(copied.split().freeze());
        let whole = (piece.len() - short) / FRAME_BYTES * FRAME_BYTES;
        pieces.push_back(piece.slice(short..short + whole));
        copied.extend_from_slice(&piece[short + whole..]);
    }
    if !copied.is_empty() {
        pieces.push_back(copied.freeze());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use arrow_flight::FlightData;
    use http_body_util::Full;

    use super::*;

    fn message() -> Message {
        Message {
            header: Bytes::from_static(b"an IPC header"),
            app_metadata: Bytes::from_static(b"warning: a note"),
            body: vec![
                Bytes::from(vec![1_u8; 100]),
                Bytes::from(vec![2_u8; 100_000]),
                Bytes::from(vec![3_u8; 7]),
            ],
        }
    }

    /// The gRPC messages of a response body: each message's bytes.
    fn messages(mut bytes: &[u8]) -> Vec<FlightData> {
        let mut messages = Vec::new();
        while let Some((&[flag, a, b, c, d], rest)) = bytes.split_first_chunk::<5>() {
            assert_eq!(flag, 0);
            let (message, rest) = rest.split_at(u32::from_be_bytes([a, b, c, d]) as usize);
            messages.push(<FlightData as prost::Message>::decode(message).unwrap());
            bytes = rest;
        }
        assert!(bytes.is_empty(), "{} bytes left over", bytes.len());
        messages
    }

    #[test]
    fn a_message_is_framed_as_the_flight_data_it_stands_for() {
        let mut pieces = VecDeque::new();
        let sent = message();
        let large = sent.body[1].clone();
        frame(sent, &mut pieces).unwrap();
        // Every piece but the last ends on a frame boundary; the middle of
        // the large body piece is shared, not copied.
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        for piece in pieces.iter().take(2) {
            assert!(
                piece.len() % FRAME_BYTES == 0 && !piece.is_empty(),
                "{}",
                piece.len()
            );
        }
        assert_eq!(pieces[1].len(), 5 * FRAME_BYTES);
        let offset = pieces[1].as_ptr() as usize - large.as_ptr() as usize;
        assert!(
            offset > 0 && offset + pieces[1].len() < large.len(),
            "{offset}"
        );
        let bytes: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(messages(&bytes), vec![FlightData::from(message())]);
        // A schema message: no body field at all.
        let mut pieces = VecDeque::new();
        let schema = Message {
            body: Vec::new(),
            app_metadata: Bytes::new(),
            ..message()
        };
        frame(schema.clone(), &mut pieces).unwrap();
        let decoded = messages(&pieces[0]);
        assert_eq!(decoded, vec![FlightData::from(schema)]);
        assert!(decoded[0].data_body.is_empty());
    }

    #[tokio::test]
    async fn the_body_ends_with_the_status_the_stream_ended_with() {
        let ok: MessageStream = Box::pin(futures::stream::iter([Ok(message()), Ok(message())]));
        let collected = MessageBody::new(ok).collect().await.unwrap();
        let trailers = collected.trailers().unwrap().clone();
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert_eq!(messages(&collected.to_bytes()).len(), 2);

        let failed: MessageStream = Box::pin(futures::stream::iter([
            Ok(message()),
            Err(Status::resource_exhausted("the query ran out of memory")),
            Ok(message()),
        ]));
        let collected = MessageBody::new(failed).collect().await.unwrap();
        let trailers = collected.trailers().unwrap().clone();
        assert_eq!(trailers.get("grpc-status").unwrap(), "8");
        assert_eq!(
            trailers.get("grpc-message").unwrap(),
            "the%20query%20ran%20out%20of%20memory"
        );
        // Nothing after the error.
        assert_eq!(messages(&collected.to_bytes()).len(), 1);
    }

    #[tokio::test]
    async fn a_request_must_hold_one_uncompressed_ticket() {
        let request = |bytes: Vec<u8>| tonic::body::Body::new(Full::new(Bytes::from(bytes)));
        let ticket = <Ticket as prost::Message>::encode_to_vec(&Ticket::new("a handle"));
        let prefixed = |flag: u8, length: usize, body: &[u8]| {
            let mut bytes = vec![flag];
            bytes.extend_from_slice(&(length as u32).to_be_bytes());
            bytes.extend_from_slice(body);
            bytes
        };
        let read = read_ticket(request(prefixed(0, ticket.len(), &ticket)))
            .await
            .unwrap();
        assert_eq!(read.ticket.as_ref(), b"a handle");

        let compressed = read_ticket(request(prefixed(1, ticket.len(), &ticket))).await;
        assert_eq!(compressed.unwrap_err().code(), tonic::Code::Unimplemented);
        for bad in [
            Vec::new(),
            vec![0, 0],
            prefixed(0, ticket.len() + 1, &ticket),
            prefixed(0, 3, &[0xff, 0xff, 0xff]),
        ] {
            let status = read_ticket(request(bad.clone())).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        let too_long = read_ticket(request(vec![0; MAX_REQUEST_BYTES + 1])).await;
        assert_eq!(too_long.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
