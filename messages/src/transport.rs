//! The NATS side of the codec, shared by servers (scheduler, worker) and [`crate::client`]:
//! reading the encoding from headers, decoding a request, and building success and error replies
//! with the `Nats-Service-Error` headers.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{CONTENT_TYPE_HEADER, Encoding};
use crate::error::{ErrorCode, SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER, WireError};

/// How a Hearth process (or an executor) logs in to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// A token.
    pub token: Option<String>,
    /// A `.creds` file (JWT + NKey seed).
    pub creds_file: Option<std::path::PathBuf>,
    /// A file holding the password (read at connect, so the secret is never in the process's
    /// environment, where `/proc/<pid>/environ` would show it).
    pub password_file: Option<std::path::PathBuf>,
    /// A file holding the token (likewise).
    pub token_file: Option<std::path::PathBuf>,
}

impl NatsAuth {
    /// From the `HEARTH_NATS_USER` / `HEARTH_NATS_PASSWORD` / `HEARTH_NATS_TOKEN` /
    /// `HEARTH_NATS_CREDS` environment variables, and `HEARTH_NATS_PASSWORD_FILE` /
    /// `HEARTH_NATS_TOKEN_FILE` (preferred: secrets in files stay out of the environment).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            user: var("HEARTH_NATS_USER"),
            password: var("HEARTH_NATS_PASSWORD"),
            token: var("HEARTH_NATS_TOKEN"),
            creds_file: var("HEARTH_NATS_CREDS").map(Into::into),
            password_file: var("HEARTH_NATS_PASSWORD_FILE").map(Into::into),
            token_file: var("HEARTH_NATS_TOKEN_FILE").map(Into::into),
        }
    }

    /// The password and token, read from their files where given.
    fn secrets(&self) -> Result<(Option<String>, Option<String>), ConnectError> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                .map_err(|e| ConnectError::Credentials(format!("{}: {e}", path.display())))
        };
        let password = match &self.password_file {
            Some(path) => Some(read(path)?),
            None => self.password.clone(),
        };
        let token = match &self.token_file {
            Some(path) => Some(read(path)?),
            None => self.token.clone(),
        };
        Ok((password, token))
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL list is malformed.
    #[error("invalid nats url {url:?}: {reason}")]
    BadUrl {
        /// The offending URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The credentials are incomplete or unreadable.
    #[error("nats credentials: {0}")]
    Credentials(String),
    /// The server could not be reached or refused us.
    #[error("connecting to {urls}: {reason}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// Why.
        reason: String,
    },
}

/// Parses a comma-separated list of NATS URLs (`nats://a:4222,nats://b:4222`).
pub fn parse_urls(urls: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err(ConnectError::BadUrl {
            url: urls.to_owned(),
            reason: "no url given".into(),
        });
    }
    list.into_iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| ConnectError::BadUrl {
                    url: u.to_owned(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// Connects to NATS the way every Hearth binary does: any of the comma-separated `urls`, logging
/// in with `auth`, named `name` (shown by the server's monitoring), retrying the first connection
/// when `retry` is set (a service started before its NATS server).
pub async fn connect(
    urls: &str,
    name: &str,
    auth: &NatsAuth,
    retry: bool,
) -> Result<async_nats::Client, ConnectError> {
    connect_with(urls, name, auth, retry, |options| options).await
}

/// [`connect`] with more options: `customize` sees the options after the name, credentials and
/// retry are set (the binaries add their event callback and reconnect backoff here).
pub async fn connect_with(
    urls: &str,
    name: &str,
    auth: &NatsAuth,
    retry: bool,
    customize: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
) -> Result<async_nats::Client, ConnectError> {
    let addrs = parse_urls(urls)?;
    let mut options = async_nats::ConnectOptions::new().name(name);
    let (password, token) = auth.secrets()?;
    match (&auth.user, &password) {
        (Some(user), Some(password)) => {
            options = options.user_and_password(user.clone(), password.clone());
        }
        (None, None) => {}
        _ => {
            return Err(ConnectError::Credentials(
                "give both a user and a password".into(),
            ));
        }
    }
    if let Some(token) = &token {
        options = options.token(token.clone());
    }
    if let Some(path) = &auth.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| ConnectError::Credentials(format!("{}: {e}", path.display())))?;
    }
    if retry {
        options = options.retry_on_initial_connect();
    }
    customize(options)
        .connect(addrs)
        .await
        .map_err(|e| ConnectError::Connect {
            urls: urls.to_owned(),
            reason: e.to_string(),
        })
}

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

/// Answers a micro-service `request` with `reply`, so that `$SRV.STATS` counts it as the micro
/// protocol expects: an error reply adds to the endpoint's `num_errors` and sets `last_error`.
///
/// async-nats counts an error only when it sends the reply itself, and then with an empty body,
/// while the body (code, message, retry hint) is Hearth's contract. So an error reply is published
/// as built, and the library is then handed the error with an empty reply subject: it records the
/// error (and the request) in the endpoint's stats, and its own publish is refused before leaving
/// the process (async-nats never publishes to an empty subject, whatever its options).
pub async fn respond(
    client: &async_nats::Client,
    mut request: async_nats::service::Request,
    reply: Reply,
) -> Result<(), async_nats::PublishError> {
    if !reply.is_error {
        return request
            .respond_with_headers(Ok(reply.payload), reply.headers)
            .await;
    }
    let error = async_nats::service::error::Error {
        status: reply
            .headers
            .get(SERVICE_ERROR_HEADER)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default(),
        code: reply
            .headers
            .get(SERVICE_ERROR_CODE_HEADER)
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(500),
    };
    let sent = match request.message.reply.replace(async_nats::Subject::from("")) {
        Some(reply_to) => reply.send(client, reply_to).await,
        // A publish, not a request: nobody to answer, but still an error of this endpoint.
        None => Ok(()),
    };
    let _ = request.respond(Err(error)).await;
    sent
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
    fn parses_url_lists() {
        assert_eq!(parse_urls("nats://a:1, nats://b:2").unwrap().len(), 2);
        assert!(parse_urls("").is_err());
        assert!(parse_urls("nats://a:notaport").is_err());
    }

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
