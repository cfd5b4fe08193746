//! [`Blob`]: a byte payload that is MessagePack `bin` on the wire and stays readable in JSON.
//!
//! In MessagePack a blob is always written as `bin`; `str` and arrays of small integers are accepted
//! on input too (Python users often pass `str`). In JSON, used by people typing requests by hand, a
//! blob is written as a plain string when it is valid UTF-8 and as `{"base64": "..."}` otherwise;
//! both forms, and arrays of integers, are accepted on input.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes on the wire (stdout, stderr, stdin, file contents).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Blob {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes decoded as UTF-8, lossily; for display.
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// Unwraps the bytes.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 64;
        let shown = &self.0[..self.0.len().min(SHOWN)];
        write!(
            f,
            "Blob({} bytes: {:?}",
            self.0.len(),
            String::from_utf8_lossy(shown)
        )?;
        if self.0.len() > SHOWN {
            f.write_str("…")?;
        }
        f.write_str(")")
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Blob(v)
    }
}

impl From<&[u8]> for Blob {
    fn from(v: &[u8]) -> Self {
        Blob(v.to_vec())
    }
}

impl From<&str> for Blob {
    fn from(v: &str) -> Self {
        Blob(v.as_bytes().to_vec())
    }
}

impl From<String> for Blob {
    fn from(v: String) -> Self {
        Blob(v.into_bytes())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return s.serialize_bytes(&self.0);
        }
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("base64", &BASE64.encode(&self.0))?;
                map.end()
            }
        }
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes, a string, an array of bytes or {\"base64\": string}")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob(v.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Blob, E> {
        Ok(Blob(v.as_bytes().to_vec()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Blob, E> {
        Ok(Blob(v.into_bytes()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Blob, E> {
        Ok(Blob::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<Blob, E> {
        Ok(Blob::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Blob(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Blob, A::Error> {
        let mut data = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "base64" {
                let text: String = map.next_value()?;
                data = Some(
                    BASE64
                        .decode(text.as_bytes())
                        .map_err(|e| de::Error::custom(format!("invalid base64: {e}")))?,
                );
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        data.map(Blob)
            .ok_or_else(|| de::Error::missing_field("base64"))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BlobVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msgpack_uses_bin() {
        let bytes = rmp_serde::to_vec_named(&Blob(vec![0xff, 0x00])).unwrap();
        // bin 8 marker, length 2
        assert_eq!(bytes, vec![0xc4, 0x02, 0xff, 0x00]);
        let back: Blob = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.0, vec![0xff, 0x00]);
    }

    #[test]
    fn msgpack_accepts_str() {
        let bytes = rmp_serde::to_vec_named("hi").unwrap();
        let back: Blob = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.as_bytes(), b"hi");
    }

    #[test]
    fn json_is_text_when_utf8_and_base64_otherwise() {
        assert_eq!(
            serde_json::to_string(&Blob::from("hi\n")).unwrap(),
            "\"hi\\n\""
        );
        let raw = Blob(vec![0xff, 0xfe]);
        let json = serde_json::to_string(&raw).unwrap();
        assert_eq!(json, "{\"base64\":\"//4=\"}");
        assert_eq!(serde_json::from_str::<Blob>(&json).unwrap(), raw);
        assert_eq!(
            serde_json::from_str::<Blob>("[104,105]")
                .unwrap()
                .as_bytes(),
            b"hi"
        );
        assert!(serde_json::from_str::<Blob>("{\"base64\":\"%%\"}").is_err());
    }
}
