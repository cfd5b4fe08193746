//! Firecracker's API (v1.16) over its Unix socket: the requests the adapter sends, built as plain
//! values (so they are tested against the documented shapes without a Firecracker), and a minimal
//! HTTP/1.1 client (one request per connection, `Content-Length` bodies).
//!
//! Firecracker answers `204 No Content` to a successful `PUT`/`PATCH`, `200` with JSON to a `GET`,
//! and `4xx` with `{"fault_message": "..."}` to a refused request.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Largest response accepted (Firecracker's are small).
const MAX_RESPONSE: usize = 1 << 20;

/// One API request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiRequest {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Value>,
}

impl ApiRequest {
    fn put(path: impl Into<String>, body: Value) -> Self {
        Self {
            method: "PUT",
            path: path.into(),
            body: Some(body),
        }
    }

    /// `PUT /machine-config`.
    pub(crate) fn machine_config(vcpus: u32, mem_mib: u32) -> Self {
        Self::put(
            "/machine-config",
            json!({"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": false}),
        )
    }

    /// `PUT /boot-source`.
    pub(crate) fn boot_source(kernel: &Path, boot_args: &str, initrd: Option<&Path>) -> Self {
        let mut body = json!({
            "kernel_image_path": kernel.to_string_lossy(),
            "boot_args": boot_args,
        });
        if let Some(initrd) = initrd {
            body["initrd_path"] = json!(initrd.to_string_lossy());
        }
        Self::put("/boot-source", body)
    }

    /// `PUT /drives/rootfs`: the VM's writable root disk. The path is relative to Firecracker's
    /// working directory (the VM's run directory), so a snapshot records `rootfs.ext4` and each
    /// restored clone opens its own copy.
    pub(crate) fn root_drive(path_on_host: &str) -> Self {
        Self::put(
            "/drives/rootfs",
            json!({
                "drive_id": "rootfs",
                "path_on_host": path_on_host,
                "is_root_device": true,
                "is_read_only": false,
            }),
        )
    }

    /// `PUT /vsock`: the guest's vsock device, exposed on the host as the Unix socket `uds_path`.
    pub(crate) fn vsock(guest_cid: u32, uds_path: &str) -> Self {
        Self::put(
            "/vsock",
            json!({"guest_cid": guest_cid, "uds_path": uds_path}),
        )
    }

    /// `PUT /network-interfaces/{id}` on a host tap device.
    pub(crate) fn network_interface(iface_id: &str, host_dev_name: &str) -> Self {
        Self::put(
            format!("/network-interfaces/{iface_id}"),
            json!({"iface_id": iface_id, "host_dev_name": host_dev_name}),
        )
    }

    /// `PUT /mmds/config`: MMDS v2 reachable from `iface_id`.
    pub(crate) fn mmds_config(iface_id: &str) -> Self {
        Self::put(
            "/mmds/config",
            json!({"version": "V2", "network_interfaces": [iface_id]}),
        )
    }

    /// `PUT /mmds`: replaces the metadata store (its contents do not survive a snapshot).
    pub(crate) fn mmds_put(data: Value) -> Self {
        Self::put("/mmds", data)
    }

    /// `PUT /actions {InstanceStart}`.
    pub(crate) fn instance_start() -> Self {
        Self::put("/actions", json!({"action_type": "InstanceStart"}))
    }

    /// `PATCH /vm {state}`: pause or resume.
    pub(crate) fn vm_state(paused: bool) -> Self {
        Self {
            method: "PATCH",
            path: "/vm".into(),
            body: Some(json!({"state": if paused { "Paused" } else { "Resumed" }})),
        }
    }

    /// `PUT /snapshot/create` (Full) of a paused VM.
    pub(crate) fn snapshot_create(snapshot_path: &Path, mem_file_path: &Path) -> Self {
        Self::put(
            "/snapshot/create",
            json!({
                "snapshot_type": "Full",
                "snapshot_path": snapshot_path.to_string_lossy(),
                "mem_file_path": mem_file_path.to_string_lossy(),
            }),
        )
    }

    /// `PUT /snapshot/load` into a fresh Firecracker, left paused, with the vsock socket and the
    /// tap devices of the new VM instead of the source's.
    pub(crate) fn snapshot_load(
        snapshot_path: &Path,
        mem_file_path: &Path,
        vsock_uds: &str,
        network_overrides: &[(String, String)],
    ) -> Self {
        let overrides: Vec<Value> = network_overrides
            .iter()
            .map(|(iface, tap)| json!({"iface_id": iface, "host_dev_name": tap}))
            .collect();
        Self::put(
            "/snapshot/load",
            json!({
                "snapshot_path": snapshot_path.to_string_lossy(),
                "mem_backend": {
                    "backend_type": "File",
                    "backend_path": mem_file_path.to_string_lossy(),
                },
                "enable_diff_snapshots": false,
                "resume_vm": false,
                "network_overrides": overrides,
                "vsock_override": {"uds_path": vsock_uds},
            }),
        )
    }

    /// The request's bytes on the wire.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let body = self
            .body
            .as_ref()
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
            self.method, self.path
        );
        if self.body.is_some() {
            out.push_str("Content-Type: application/json\r\n");
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }
}

/// A failed API exchange.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("firecracker api: {0}")]
    Io(#[from] std::io::Error),
    #[error("firecracker api {method} {path} did not answer within {after:?}")]
    Timeout {
        method: &'static str,
        path: String,
        after: Duration,
    },
    #[error("firecracker refused {method} {path} ({status}): {fault}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        fault: String,
    },
    #[error("firecracker api: malformed response: {0}")]
    Malformed(String),
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiResponse {
    pub status: u16,
    pub body: Option<Value>,
}

/// Parses a complete response; `None` if more bytes are needed.
pub(crate) fn parse_response(bytes: &[u8]) -> Result<Option<ApiResponse>, ApiError> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::Malformed(format!("status line {status_line:?}")))?;
    let mut length = 0usize;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .map_err(|_| ApiError::Malformed(format!("content-length {value:?}")))?;
        }
    }
    let body = &bytes[end + 4..];
    if body.len() < length {
        return Ok(None);
    }
    let body = &body[..length];
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(serde_json::from_slice(body).map_err(|e| ApiError::Malformed(format!("body: {e}")))?)
    };
    Ok(Some(ApiResponse { status, body }))
}

/// Sends `request` to the API socket at `socket` and returns the response body of a success.
pub(crate) async fn send(
    socket: &Path,
    request: &ApiRequest,
    timeout: Duration,
) -> Result<Option<Value>, ApiError> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(&request.encode()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(response) = parse_response(&buf)? {
                return Ok::<_, ApiError>(response);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(ApiError::Malformed("connection closed mid-response".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE {
                return Err(ApiError::Malformed("response too large".into()));
            }
        }
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ApiError::Timeout {
            method: request.method,
            path: request.path.clone(),
            after: timeout,
        })??;
    if (200..300).contains(&response.status) {
        return Ok(response.body);
    }
    let fault = response
        .body
        .as_ref()
        .and_then(|b| b.get("fault_message"))
        .and_then(Value::as_str)
        .unwrap_or("no fault message")
        .to_owned();
    Err(ApiError::Refused {
        method: request.method,
        path: request.path.clone(),
        status: response.status,
        fault,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shapes() {
        let r = ApiRequest::machine_config(2, 512);
        assert_eq!((r.method, r.path.as_str()), ("PUT", "/machine-config"));
        assert_eq!(
            r.body.unwrap(),
            json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false})
        );

        let r = ApiRequest::boot_source(Path::new("/k/vmlinux"), "console=ttyS0", None);
        assert_eq!(
            r.body.unwrap(),
            json!({"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"})
        );
        let r = ApiRequest::boot_source(Path::new("/k"), "", Some(Path::new("/i")));
        assert_eq!(r.body.unwrap()["initrd_path"], "/i");

        let r = ApiRequest::root_drive("rootfs.ext4");
        assert_eq!(r.path, "/drives/rootfs");
        assert_eq!(
            r.body.unwrap(),
            json!({"drive_id": "rootfs", "path_on_host": "rootfs.ext4",
                   "is_root_device": true, "is_read_only": false})
        );

        let r = ApiRequest::vsock(3, "v.sock");
        assert_eq!(
            (r.path.as_str(), r.body.unwrap()),
            ("/vsock", json!({"guest_cid": 3, "uds_path": "v.sock"}))
        );

        let r = ApiRequest::instance_start();
        assert_eq!(
            (r.path.as_str(), r.body.unwrap()),
            ("/actions", json!({"action_type": "InstanceStart"}))
        );

        let r = ApiRequest::vm_state(true);
        assert_eq!((r.method, r.path.as_str()), ("PATCH", "/vm"));
        assert_eq!(r.body.unwrap(), json!({"state": "Paused"}));
        assert_eq!(
            ApiRequest::vm_state(false).body.unwrap(),
            json!({"state": "Resumed"})
        );

        let r = ApiRequest::snapshot_create(Path::new("/s/vmstate"), Path::new("/s/mem"));
        assert_eq!(
            (r.path.as_str(), r.body.unwrap()),
            (
                "/snapshot/create",
                json!({"snapshot_type": "Full", "snapshot_path": "/s/vmstate",
                       "mem_file_path": "/s/mem"})
            )
        );

        let r = ApiRequest::snapshot_load(
            Path::new("/s/vmstate"),
            Path::new("/s/mem"),
            "v.sock",
            &[("eth0".into(), "tap7".into())],
        );
        assert_eq!(r.path, "/snapshot/load");
        assert_eq!(
            r.body.unwrap(),
            json!({
                "snapshot_path": "/s/vmstate",
                "mem_backend": {"backend_type": "File", "backend_path": "/s/mem"},
                "enable_diff_snapshots": false,
                "resume_vm": false,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
                "vsock_override": {"uds_path": "v.sock"},
            })
        );

        let r = ApiRequest::mmds_config("eth0");
        assert_eq!(
            r.body.unwrap(),
            json!({"version": "V2", "network_interfaces": ["eth0"]})
        );
        let r = ApiRequest::network_interface("eth0", "tap7");
        assert_eq!(r.path, "/network-interfaces/eth0");
        assert_eq!(ApiRequest::mmds_put(json!({"a": 1})).path, "/mmds");
    }

    #[test]
    fn requests_encode_as_http_with_a_content_length() {
        let bytes = ApiRequest::vm_state(true).encode();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("PATCH /vm HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("Content-Type: application/json"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(body, r#"{"state":"Paused"}"#);
        let get = ApiRequest {
            method: "GET",
            path: "/".into(),
            body: None,
        };
        let get = String::from_utf8(get.encode()).unwrap();
        assert!(get.ends_with("Content-Length: 0\r\n\r\n"), "{get}");
        assert!(!get.contains("Content-Type"));
    }

    #[test]
    fn responses_parse_incrementally_and_faults_are_read() {
        let ok = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(
            parse_response(ok).unwrap(),
            Some(ApiResponse {
                status: 204,
                body: None
            })
        );
        let body =
            r#"{"id":"vm","state":"Running","vmm_version":"1.16.0","app_name":"Firecracker"}"#;
        let info = format!(
            "HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let info = info.as_bytes();
        let response = parse_response(info).unwrap().unwrap();
        assert_eq!(response.body.unwrap()["state"], "Running");
        assert_eq!(parse_response(&info[..info.len() - 5]).unwrap(), None);
        assert_eq!(parse_response(b"HTTP/1.1 200 \r\nConte").unwrap(), None);
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn refused_requests_carry_the_fault_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            for answer in ["HTTP/1.1 204 \r\n\r\n".to_owned(), {
                let body = r#"{"fault_message":"The requested operation is not supported after starting the microVM."}"#;
                format!(
                    "HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await.unwrap();
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let t = Duration::from_secs(5);
        assert_eq!(
            send(&path, &ApiRequest::instance_start(), t).await.unwrap(),
            None
        );
        let err = send(&path, &ApiRequest::machine_config(1, 128), t)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ApiError::Refused { status: 400, fault, .. } if fault.contains("not supported")),
            "{err}"
        );
    }
}
