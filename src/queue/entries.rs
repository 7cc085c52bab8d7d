//! Reads stream entries out of raw `XREADGROUP` / `XCLAIM` replies, keeping field names
//! and values as bytes so that a field that is not UTF-8 becomes a clear job error rather
//! than a failed read.

use redis::Value;

/// One stream entry: its id and its fields in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn string(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// Parses `[[id, [f, v, ...]], ...]`; entries deleted meanwhile (nil fields) are skipped.
pub fn parse_entry_list(v: &Value) -> Vec<Entry> {
    items(v)
        .iter()
        .filter_map(|e| {
            let parts = items(e);
            let id = string(parts.first()?)?;
            let raw = parts.get(1)?;
            if matches!(raw, Value::Nil) {
                return None;
            }
            let flat = items(raw);
            let fields = flat
                .chunks(2)
                .filter_map(|kv| Some((bytes(kv.first()?)?, bytes(kv.get(1)?)?)))
                .collect();
            Some(Entry { id, fields })
        })
        .collect()
}

/// Parses an `XREADGROUP`/`XREAD` reply for a single stream (RESP2 array or RESP3 map).
pub fn parse_read_reply(v: &Value) -> Vec<Entry> {
    match v {
        Value::Nil => Vec::new(),
        Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(_, list)| parse_entry_list(list))
            .collect(),
        other => items(other)
            .iter()
            .flat_map(|stream| {
                items(stream)
                    .get(1)
                    .map(parse_entry_list)
                    .unwrap_or_default()
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bs(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn reads_entries_with_binary_values_and_skips_deleted_ones() {
        let reply = Value::Array(vec![Value::Array(vec![
            bs(b"{fr}:jobs"),
            Value::Array(vec![
                Value::Array(vec![
                    bs(b"1-0"),
                    Value::Array(vec![
                        bs(b"stream_ref"),
                        bs(b"cam"),
                        bs(b"prompt"),
                        bs(&[0xff]),
                    ]),
                ]),
                Value::Array(vec![bs(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(entries[0].fields[1], (b"prompt".to_vec(), vec![0xff]));
        assert!(parse_read_reply(&Value::Nil).is_empty());
    }

    #[test]
    fn reads_an_xclaim_reply() {
        let reply = Value::Array(vec![Value::Array(vec![
            bs(b"3-0"),
            Value::Array(vec![bs(b"stream_ref"), bs(b"x")]),
        ])]);
        let entries = parse_entry_list(&reply);
        assert_eq!(entries[0].id, "3-0");
        assert_eq!(
            entries[0].fields,
            vec![(b"stream_ref".to_vec(), b"x".to_vec())]
        );
    }
}
