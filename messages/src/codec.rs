//! The codec: MessagePack maps with field names by default (`rmp_serde::to_vec_named`, never the
//! positional form, so Python's `msgpack` and future fields work); JSON when the request says
//! `Content-Type: application/json`, answered in JSON.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::WireError;

/// The header that selects JSON.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
/// Content type of JSON payloads.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// Content type of MessagePack payloads (the default; the header is optional).
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// MessagePack maps with field names.
    #[default]
    MsgPack,
    /// JSON, for people typing requests by hand.
    Json,
}

/// A value could not be encoded (a bug: every wire type is encodable).
#[derive(Debug, thiserror::Error)]
#[error("encoding failed: {0}")]
pub struct EncodeError(String);

impl From<EncodeError> for WireError {
    fn from(err: EncodeError) -> Self {
        WireError::internal(err.to_string())
    }
}

impl Encoding {
    /// JSON if the content type is `application/json` (parameters allowed), else MessagePack.
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(ct)
                if ct
                    .split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case(JSON_CONTENT_TYPE)) =>
            {
                Encoding::Json
            }
            _ => Encoding::MsgPack,
        }
    }

    /// The content type to put on a reply in this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::MsgPack => MSGPACK_CONTENT_TYPE,
            Encoding::Json => JSON_CONTENT_TYPE,
        }
    }

    /// Encodes `value`.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, EncodeError> {
        match self {
            Encoding::MsgPack => {
                rmp_serde::to_vec_named(value).map_err(|e| EncodeError(e.to_string()))
            }
            Encoding::Json => serde_json::to_vec(value).map_err(|e| EncodeError(e.to_string())),
        }
    }

    /// Decodes `payload`; an empty payload decodes as an empty map, so requests whose fields
    /// are all optional may be sent with no body. Any failure is a 400 [`WireError`] naming the
    /// problem — never a panic.
    pub fn decode<T: DeserializeOwned>(self, payload: &[u8]) -> Result<T, WireError> {
        let result = match self {
            Encoding::MsgPack => {
                let payload = if payload.is_empty() {
                    &[0x80][..]
                } else {
                    payload
                };
                rmp_serde::from_slice(payload).map_err(|e| e.to_string())
            }
            Encoding::Json => {
                let payload = if payload.iter().all(u8::is_ascii_whitespace) {
                    &b"{}"[..]
                } else {
                    payload
                };
                serde_json::from_slice(payload).map_err(|e| e.to_string())
            }
        };
        result.map_err(|reason| {
            let kind = match self {
                Encoding::MsgPack => "msgpack",
                Encoding::Json => "json",
            };
            WireError::bad_request(format!("malformed {kind} request: {reason}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CreateSessionRequest, Empty};
    use crate::data::ExecRequest;
    use crate::error::ErrorCode;

    #[test]
    fn content_type_selects_json() {
        assert_eq!(
            Encoding::from_content_type(Some("application/json; charset=utf-8")),
            Encoding::Json
        );
        assert_eq!(
            Encoding::from_content_type(Some("Application/JSON")),
            Encoding::Json
        );
        assert_eq!(Encoding::from_content_type(None), Encoding::MsgPack);
        assert_eq!(
            Encoding::from_content_type(Some("text/plain")),
            Encoding::MsgPack
        );
    }

    #[test]
    fn msgpack_is_a_named_map() {
        let req = ExecRequest::cmd("true");
        let bytes = Encoding::MsgPack.encode(&req).unwrap();
        // A fixmap, not a fixarray: field names travel.
        assert_eq!(bytes[0] & 0xf0, 0x80);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("cmd"), "{text}");
    }

    #[test]
    fn empty_payload_is_an_empty_request() {
        let req: CreateSessionRequest = Encoding::MsgPack.decode(b"").unwrap();
        assert_eq!(req, CreateSessionRequest::default());
        let _: Empty = Encoding::Json.decode(b"  ").unwrap();
    }

    #[test]
    fn garbage_is_a_400_not_a_panic() {
        for payload in [&b"\xc1"[..], b"\x92\x01", b"{not json", b"\xff\xff\xff"] {
            for enc in [Encoding::MsgPack, Encoding::Json] {
                let err = enc.decode::<ExecRequest>(payload).unwrap_err();
                assert_eq!(err.code, ErrorCode::BadRequest, "{payload:?}");
            }
        }
        // Right shape, wrong type.
        let err = Encoding::Json
            .decode::<ExecRequest>(br#"{"argv": "not-a-list"}"#)
            .unwrap_err();
        assert!(err.message.contains("malformed json request"), "{err}");
    }
}
