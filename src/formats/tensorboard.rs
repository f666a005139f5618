//! TensorBoard event files (`events.out.tfevents.<time>.<host>`), scalars only.
//!
//! A file is a sequence of records: u64 length, u32 masked CRC-32C of the length, the data,
//! u32 masked CRC-32C of the data (mask: `((c >> 15) | (c << 17)) + 0xa282ead8`). The data is
//! a protobuf `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
//! summary = 5 { value = 1 { tag = 1, simple_value = 2 (float) } } }`; the first event
//! carries `file_version = "brain.Event:2"`. Each record is flushed as it is written, so a
//! killed run keeps every scalar logged before the kill.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC: [u32; 256] = crc_table();

/// CRC-32C (Castagnoli).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn masked(c: u32) -> u32 {
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut e, 2, 0);
    varint(&mut e, step as u64);
    body(&mut e);
    e
}

/// Writes scalars to one event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// Create `dir/events.out.tfevents.<unix time>.<host>` and write the version event.
    pub fn create(dir: &Path) -> io::Result<Self> {
        crate::util::atomic::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "sdkit".into());
        let t = now();
        let path = dir.join(format!("events.out.tfevents.{}.{host}", t as u64));
        let file = File::create(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut w = Self { file, path };
        let e = event(t, 0, |e| bytes_field(e, 3, b"brain.Event:2"));
        w.record(&e)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut r = Vec::with_capacity(data.len() + 16);
        r.extend_from_slice(&len);
        r.extend_from_slice(&masked(crc32c(&len)).to_le_bytes());
        r.extend_from_slice(data);
        r.extend_from_slice(&masked(crc32c(data)).to_le_bytes());
        self.file.write_all(&r)?;
        self.file.flush()
    }

    /// Log scalars `(tag, value)` at `step`, in one event.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> io::Result<()> {
        let e = event(now(), step as i64, |e| {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut val = Vec::new();
                bytes_field(&mut val, 1, tag.as_bytes());
                key(&mut val, 2, 5);
                val.extend_from_slice(&v.to_le_bytes());
                bytes_field(&mut summary, 1, &val);
            }
            bytes_field(e, 5, &summary);
        });
        self.record(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn records_frame_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, &[("loss/current", 0.5)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut off = 0;
        let mut n = 0;
        while off < bytes.len() {
            let len = u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap()) as usize;
            let lc = u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap());
            assert_eq!(lc, masked(crc32c(&bytes[off..off + 8])));
            let data = &bytes[off + 12..off + 12 + len];
            let dc = u32::from_le_bytes(bytes[off + 12 + len..off + 16 + len].try_into().unwrap());
            assert_eq!(dc, masked(crc32c(data)));
            off += 16 + len;
            n += 1;
        }
        assert_eq!(n, 2);
        let last = &bytes[bytes.len() - 4 - 4..bytes.len() - 4];
        assert_eq!(f32::from_le_bytes(last.try_into().unwrap()), 0.5);
    }
}
