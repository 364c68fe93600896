//! TensorBoard event files (`events.out.tfevents.*`): the TFRecord framing and the two protobuf
//! messages of TensorFlow's `event.proto` and `summary.proto` that scalar curves need, so that
//! `tensorboard --logdir DIR` reads what a training stage logs. It writes; it never interprets
//! metrics (which values are logged, under which names, is the training loop's business).
//!
//! ```text
//! record := u64 length (LE) | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)
//! data   := Event { wall_time, step, file_version | summary { value { tag, simple_value }* } }
//! ```
//!
//! The first record of a file is an `Event` with `file_version = "brain.Event:2"`, as every
//! TensorFlow writer emits. Each record is flushed as it is written, so TensorBoard shows the
//! curves while training goes on.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// `tensorflow.Event`, with only the fields rudder writes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` holding a scalar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    /// In `summary.proto` the value is a `oneof`, so it has presence: a scalar of 0.0 is written
    /// (a plain proto3 float of 0.0 would be left out, and TensorBoard would drop the point).
    #[prost(oneof = "Scalar", tags = "2")]
    pub value: Option<Scalar>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Scalar {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

impl SummaryValue {
    pub fn simple_value(&self) -> Option<f32> {
        self.value.as_ref().map(|Scalar::SimpleValue(v)| *v)
    }
}

/// The version string TensorBoard expects in a file's first event.
pub const FILE_VERSION: &str = "brain.Event:2";

/// Appends scalar events to one event file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix seconds>.rudder` with its file-version record.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        let path = dir.join(format!(
            "events.out.tfevents.{}.rudder",
            now().trunc() as u64
        ));
        let mut writer = EventWriter {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        writer.write(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        })?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding every finite value of `values` as a scalar at `step`.
    pub fn scalars<'a>(
        &mut self,
        step: u64,
        values: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> std::io::Result<()> {
        let value: Vec<SummaryValue> = values
            .into_iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue {
                tag: tag.to_owned(),
                value: Some(Scalar::SimpleValue(v as f32)),
            })
            .collect();
        self.write(&Event {
            wall_time: now(),
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(What::Summary(Summary { value })),
        })
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        self.out
            .write_all(&record(&prost::Message::encode_to_vec(event)))?;
        self.out.flush()
    }
}

/// One TFRecord: the data framed by its length and both CRCs.
pub fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masked CRC32C: rotated and offset so that a CRC of data holding CRCs stays strong.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Reads every record of an event file back, checking both CRCs of each.
pub fn read(path: &Path) -> std::io::Result<Vec<Event>> {
    let bytes = std::fs::read(path)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut events = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(bad("truncated record header"));
        }
        let (length, tail) = rest.split_at(8);
        let crc = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        if crc != masked_crc(length) {
            return Err(bad("bad length CRC"));
        }
        let n = usize::try_from(u64::from_le_bytes(length.try_into().expect("8 bytes")))
            .map_err(|_| bad("record too long"))?;
        let tail = &tail[4..];
        if tail.len() < n + 4 {
            return Err(bad("truncated record"));
        }
        let (data, tail) = tail.split_at(n);
        let crc = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            return Err(bad("bad data CRC"));
        }
        events.push(<Event as prost::Message>::decode(data).map_err(|e| bad(&e.to_string()))?);
        rest = &tail[4..];
    }
    Ok(events)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC32C("123456789") is 0xE3069283 (RFC 3720's check value).
        // The masked values are those of TensorBoard's own `masked_crc32c`.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc(&[0; 8]), 0x0798_0329);
        let framed = record(b"");
        assert_eq!(
            framed[..12],
            [0, 0, 0, 0, 0, 0, 0, 0, 0x29, 0x03, 0x98, 0x07]
        );
    }

    #[test]
    fn the_protobuf_encoding_is_tensorflows() {
        // Event{wall_time: 1.5, step: 3, summary{value{tag: "loss", simple_value: 0.25},
        // value{tag: "acc", simple_value: 0}}}, encoded by hand from event.proto and summary.proto's field numbers and types.
        let event = Event {
            wall_time: 1.5,
            step: 3,
            what: Some(What::Summary(Summary {
                value: vec![
                    SummaryValue {
                        tag: "loss".into(),
                        value: Some(Scalar::SimpleValue(0.25)),
                    },
                    SummaryValue {
                        tag: "acc".into(),
                        value: Some(Scalar::SimpleValue(0.0)),
                    },
                ],
            })),
        };
        let mut expected = vec![0x09];
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        // step; summary (25 bytes): two values of 11 and 10 bytes, each with its header.
        expected.extend_from_slice(&[0x10, 0x03, 0x2a, 0x19, 0x0a, 0x0b, 0x0a, 0x04]);
        expected.extend_from_slice(b"loss");
        expected.push(0x15);
        expected.extend_from_slice(&0.25f32.to_le_bytes());
        // A zero is written all the same: the scalar is a oneof member.
        expected.extend_from_slice(&[0x0a, 0x0a, 0x0a, 0x03]);
        expected.extend_from_slice(b"acc");
        expected.push(0x15);
        expected.extend_from_slice(&0.0f32.to_le_bytes());
        assert_eq!(prost::Message::encode_to_vec(&event), expected);
    }

    #[test]
    fn written_events_read_back_with_their_steps_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path()).unwrap();
        writer
            .scalars(10, [("train/loss", 0.5), ("train/nan", f64::NAN)])
            .unwrap();
        writer.scalars(20, [("train/loss", 0.25)]).unwrap();
        let name = writer.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events = read(writer.path()).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        let Some(What::Summary(first)) = &events[1].what else {
            panic!("a summary")
        };
        assert_eq!(events[1].step, 10);
        // Non-finite values are left out, as metrics.jsonl writes them as null.
        assert_eq!(first.value.len(), 1);
        assert_eq!(first.value[0].tag, "train/loss");
        assert_eq!(first.value[0].simple_value(), Some(0.5));
        assert_eq!(events[2].step, 20);
        assert!(events[2].wall_time >= events[1].wall_time);

        // A flipped byte is caught by the data CRC.
        let mut bytes = std::fs::read(writer.path()).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(writer.path(), bytes).unwrap();
        assert!(read(writer.path()).is_err());
    }
}
