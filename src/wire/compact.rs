//! Compact serde form of text that came from the network, for the event log.
//!
//! JSON must escape every control character as `\u00XX`, six bytes for one,
//! so a string of them grows sixfold in a log. A string with any control
//! character is written as `{"b64": "..."}` instead (base64 of its UTF-8
//! bytes, four bytes per three); any other string as itself, where only `"`
//! and `\` take two bytes. Either form reads back to the same string.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Serializes `s` compactly (see the module docs).
pub fn serialize<S: Serializer>(s: &str, ser: S) -> Result<S::Ok, S::Error> {
    if s.bytes().any(|b| b < 0x20) {
        #[derive(Serialize)]
        struct B64 {
            b64: String,
        }
        B64 {
            b64: encode(s.as_bytes()),
        }
        .serialize(ser)
    } else {
        ser.serialize_str(s)
    }
}

/// Reads either form back.
pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Plain(String),
        B64 { b64: String },
    }
    match Repr::deserialize(de)? {
        Repr::Plain(s) => Ok(s),
        Repr::B64 { b64 } => decode(&b64)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| serde::de::Error::custom("invalid base64 text")),
    }
}

fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if text.len() % 4 != 0 {
        return None;
    }
    let value = |c: u8| ALPHABET.iter().position(|&a| a == c).map(|v| v as u32);
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for (i, quad) in text.chunks(4).enumerate() {
        let last = i == text.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = n << 6 | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Text(#[serde(with = "super")] String);

    #[test]
    fn base64_round_trips_every_length() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 5) as u8).collect();
            assert_eq!(decode(&encode(&bytes)), Some(bytes));
        }
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode(b"fo"), "Zm8=");
        assert_eq!(decode("Zm8"), None);
        assert_eq!(decode("Z=8="), None);
        assert_eq!(decode("Zm*="), None);
    }

    #[test]
    fn control_characters_are_stored_compactly_and_read_back() {
        let nasty: String = (0..256).map(|i| char::from((i % 32) as u8)).collect();
        let line = serde_json::to_string(&Text(nasty.clone())).unwrap();
        assert!(line.len() < 256 * 4 / 3 + 16, "{} bytes", line.len());
        assert_eq!(serde_json::from_str::<Text>(&line).unwrap().0, nasty);
        // Plain text stays plain and readable.
        let line = serde_json::to_string(&Text("720p \"hd\"".into())).unwrap();
        assert_eq!(line, r#""720p \"hd\"""#);
        assert_eq!(
            serde_json::from_str::<Text>(&line).unwrap().0,
            "720p \"hd\""
        );
    }
}
