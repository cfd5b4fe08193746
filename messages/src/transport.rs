//! The NATS side of the codec, shared by servers (scheduler, worker) and [`crate::client`]:
//! reading the encoding from headers, decoding a request, and building success and error replies
//! with the `Nats-Service-Error` headers.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{CONTENT_TYPE_HEADER, Encoding};
use crate::error::{ErrorCode, SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER, WireError};

/// The encoding a message asks for (its `Content-Type` header).
pub fn encoding_of(headers: Option<&HeaderMap>) -> Encoding {
    Encoding::from_content_type(
        headers
            .and_then(|h| h.get(CONTENT_TYPE_HEADER))
            .map(|v| v.as_str()),
    )
}

/// Decodes a request message: the encoding to answer in, and the request or a 400.
pub fn decode_message<T: DeserializeOwned>(
    message: &async_nats::Message,
) -> (Encoding, Result<T, WireError>) {
    let encoding = encoding_of(message.headers.as_ref());
    (encoding, encoding.decode(&message.payload))
}

/// A reply ready to publish: headers (possibly empty) and payload.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Content type for JSON replies; the service error headers for errors.
    pub headers: HeaderMap,
    /// The encoded body.
    pub payload: Bytes,
    /// Whether this is an error reply.
    pub is_error: bool,
}

impl Reply {
    /// A success reply carrying `value`. If encoding fails (a bug), a 500 reply instead.
    pub fn ok<T: Serialize + ?Sized>(encoding: Encoding, value: &T) -> Reply {
        match encoding.encode(value) {
            Ok(payload) => Reply {
                headers: content_type_headers(encoding),
                payload: payload.into(),
                is_error: false,
            },
            Err(err) => Reply::error(encoding, &err.into()),
        }
    }

    /// An error reply: `Nats-Service-Error(-Code)` headers and a `{code, message}` body.
    pub fn error(encoding: Encoding, error: &WireError) -> Reply {
        let mut headers = content_type_headers(encoding);
        headers.insert(SERVICE_ERROR_HEADER, header_safe(&error.message).as_str());
        headers.insert(
            SERVICE_ERROR_CODE_HEADER,
            error.code.as_u16().to_string().as_str(),
        );
        let payload = encoding.encode(error).unwrap_or_default();
        Reply {
            headers,
            payload: payload.into(),
            is_error: true,
        }
    }

    /// A success or error reply from a result.
    pub fn from_result<T: Serialize>(encoding: Encoding, result: &Result<T, WireError>) -> Reply {
        match result {
            Ok(value) => Reply::ok(encoding, value),
            Err(error) => Reply::error(encoding, error),
        }
    }

    /// Publishes this reply to `subject`.
    pub async fn send(
        self,
        client: &async_nats::Client,
        subject: async_nats::Subject,
    ) -> Result<(), async_nats::PublishError> {
        client
            .publish_with_headers(subject, self.headers, self.payload)
            .await
    }
}

fn content_type_headers(encoding: Encoding) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if encoding == Encoding::Json {
        headers.insert(CONTENT_TYPE_HEADER, encoding.content_type());
    }
    headers
}

/// Header values may not carry line breaks; keep them short too.
fn header_safe(text: &str) -> String {
    const MAX: usize = 512;
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX)
        .collect();
    if out.is_empty() {
        out.push_str("error");
    }
    out
}

/// Reads a reply: the error it carries (from the headers, with the body's details when present),
/// or `Ok` with the payload to decode.
pub fn check_reply(message: &async_nats::Message) -> Result<(), WireError> {
    let Some(headers) = message.headers.as_ref() else {
        return Ok(());
    };
    let Some(code) = headers.get(SERVICE_ERROR_CODE_HEADER) else {
        return Ok(());
    };
    let code = ErrorCode::from_u16(code.as_str().trim().parse().unwrap_or(500));
    let encoding = encoding_of(Some(headers));
    match encoding.decode::<WireError>(&message.payload) {
        Ok(body) => Err(body),
        Err(_) => Err(WireError::new(
            code,
            headers
                .get(SERVICE_ERROR_HEADER)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_else(|| "error".to_owned()),
        )),
    }
}

/// Decodes a reply's payload, turning error replies into their [`WireError`].
pub fn decode_reply<T: DeserializeOwned>(message: &async_nats::Message) -> Result<T, WireError> {
    check_reply(message)?;
    encoding_of(message.headers.as_ref())
        .decode(&message.payload)
        .map_err(|e| WireError::internal(format!("undecodable reply: {}", e.message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_headers_are_single_line() {
        let reply = Reply::error(
            Encoding::MsgPack,
            &WireError::bad_request("line one\nline two"),
        );
        let text = reply.headers.get(SERVICE_ERROR_HEADER).unwrap().as_str();
        assert_eq!(text, "line one line two");
        assert_eq!(
            reply
                .headers
                .get(SERVICE_ERROR_CODE_HEADER)
                .unwrap()
                .as_str(),
            "400"
        );
    }
}
