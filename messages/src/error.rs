//! The error model of the NATS services (micro) API: an error is data — a numeric code and a message
//! in the `Nats-Service-Error-Code` / `Nats-Service-Error` headers, repeated as a `{code, message}`
//! body so clients that ignore headers still see it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Header carrying the error text.
pub const SERVICE_ERROR_HEADER: &str = "Nats-Service-Error";
/// Header carrying the numeric error code.
pub const SERVICE_ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";

/// The error codes of the v1 contract. HTTP-like on purpose: executor authors know them already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: the request is malformed or invalid; retrying it unchanged will fail again.
    BadRequest,
    /// 404: the session, template, VM or snapshot does not exist.
    NotFound,
    /// 409: the request conflicts with current state (idempotency key reused differently,
    /// exec on a destroyed VM, rename onto an existing id).
    Conflict,
    /// 429: a quota was exceeded; retry later.
    Quota,
    /// 500: a bug or an unexpected failure on the server.
    Internal,
    /// 503: no capacity right now; retry after `retry_after_ms`.
    NoCapacity,
    /// 504: a deadline passed before the work finished.
    Deadline,
    /// 507: the session's disk quota is full (a write that did not fit).
    InsufficientStorage,
    /// A code this version does not know (from a newer peer). Kept, not rejected.
    Other(u16),
}

impl ErrorCode {
    /// The numeric code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Quota => 429,
            ErrorCode::Internal => 500,
            ErrorCode::NoCapacity => 503,
            ErrorCode::Deadline => 504,
            ErrorCode::InsufficientStorage => 507,
            ErrorCode::Other(code) => code,
        }
    }

    /// Maps a numeric code; unknown codes are preserved as [`ErrorCode::Other`].
    pub fn from_u16(code: u16) -> Self {
        match code {
            400 => ErrorCode::BadRequest,
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            429 => ErrorCode::Quota,
            500 => ErrorCode::Internal,
            503 => ErrorCode::NoCapacity,
            504 => ErrorCode::Deadline,
            507 => ErrorCode::InsufficientStorage,
            other => ErrorCode::Other(other),
        }
    }

    /// Whether a caller may retry the same request later and expect it to succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Quota | ErrorCode::NoCapacity | ErrorCode::Deadline
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ErrorCode::from_u16(u16::deserialize(d)?))
    }
}

/// An error as it travels on the wire: the reply body of a failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// The numeric code, also in the `Nats-Service-Error-Code` header.
    pub code: ErrorCode,
    /// Human-readable, lowercase, no trailing period; also in the `Nats-Service-Error` header.
    pub message: String,
    /// With 503 (and 429): how long the caller should wait before retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl WireError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// 503 with a retry hint.
    pub fn no_capacity(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(ErrorCode::NoCapacity, message)
        }
    }

    /// 429: a quota is exhausted; `retry_after_ms` when waiting helps (a rate limit).
    pub fn quota(message: impl Into<String>, retry_after_ms: Option<u64>) -> Self {
        Self {
            retry_after_ms,
            ..Self::new(ErrorCode::Quota, message)
        }
    }

    /// 504.
    pub fn deadline(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Deadline, message)
    }

    /// Whether the caller may retry later.
    pub fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }
}

impl From<crate::IdError> for WireError {
    fn from(err: crate::IdError) -> Self {
        WireError::bad_request(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_survive() {
        for code in [400, 404, 409, 429, 500, 503, 504, 418] {
            assert_eq!(ErrorCode::from_u16(code).as_u16(), code);
        }
        assert_eq!(ErrorCode::from_u16(418), ErrorCode::Other(418));
        assert!(ErrorCode::NoCapacity.is_retryable());
        assert!(!ErrorCode::Conflict.is_retryable());
    }
}
