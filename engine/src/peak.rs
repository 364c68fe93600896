//! A stage's measured peak memory, as its manifest records it: the resident set's high-water
//! mark of the process (`VmHWM` in `/proc/self/status`), reset when the stage starts by
//! writing `5` to `/proc/self/clear_refs` (Linux only; elsewhere nothing is recorded).
//!
//! Stages running at once under `-j` share the process, and so its high-water mark: a stage
//! that had the process to itself from start to end records the peak over its run
//! (`scope = "stage"`; the reset starts from the resident set at that moment, which includes
//! what the allocator kept of earlier stages' memory);
//! one that overlapped another records the process's peak over a span covering its run
//! (`scope = "process"`), an upper bound of its own. The mark is only reset when no other
//! stage is running, so one stage's reset never hides another's peak. A command stage's own
//! process is not counted (only the rudder process is measured). Peak memory is never part of
//! a key. Owns the measurement only; the manifest field is `store.rs`'s.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

/// Version of the [`PeakMemory`] record's format, which it carries.
pub const PEAK_MEMORY_FORMAT: u32 = 1;

/// What a stage's peak covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakScope {
    /// The stage ran alone in the process: its own peak.
    Stage,
    /// Other stages ran in the process at the same time: the process's peak.
    Process,
}

/// `manifest.json`'s `peak_memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeakMemory {
    /// [`PEAK_MEMORY_FORMAT`] when written.
    pub format: u32,
    /// Peak resident memory in bytes.
    pub bytes: u64,
    pub scope: PeakScope,
}

/// Reads a manifest's `peak_memory` as absent when it is not a record this version
/// understands (a newer format or scope): a measurement never makes an artifact unreadable.
pub fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PeakMemory>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(value
        .and_then(|v| serde_json::from_value::<PeakMemory>(v).ok())
        .filter(|p| p.format <= PEAK_MEMORY_FORMAT))
}

/// Stages running in this process now.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// Bumped whenever a stage starts while another runs, so that a running stage learns it was
/// overlapped.
static OVERLAPS: AtomicU64 = AtomicU64::new(0);

/// Watches one stage from start to end; dropping it ends the watch.
#[derive(Debug)]
pub struct PeakWatch {
    alone: bool,
    overlaps: u64,
}

impl PeakWatch {
    /// Starts watching a stage: resets the high-water mark when no other stage runs.
    pub fn start() -> PeakWatch {
        let others = RUNNING.fetch_add(1, Ordering::SeqCst);
        // A mark that could not be reset covers the process's life: not the stage's own.
        let alone = others == 0 && reset_high_water_mark();
        if others != 0 {
            OVERLAPS.fetch_add(1, Ordering::SeqCst);
        }
        PeakWatch {
            alone,
            overlaps: OVERLAPS.load(Ordering::SeqCst),
        }
    }

    /// The peak so far, and what it covers; `None` where it cannot be read.
    pub fn peak(&self) -> Option<PeakMemory> {
        let bytes = high_water_mark()?;
        let overlapped = !self.alone || OVERLAPS.load(Ordering::SeqCst) != self.overlaps;
        Some(PeakMemory {
            format: PEAK_MEMORY_FORMAT,
            bytes,
            scope: if overlapped {
                PeakScope::Process
            } else {
                PeakScope::Stage
            },
        })
    }
}

impl Drop for PeakWatch {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether the mark was reset. Best effort: without it the mark covers the process's life,
/// still an upper bound.
fn reset_high_water_mark() -> bool {
    #[cfg(target_os = "linux")]
    return std::fs::write("/proc/self/clear_refs", "5").is_ok();
    #[cfg(not(target_os = "linux"))]
    false
}

/// `VmHWM` of `/proc/self/status`, in bytes.
fn high_water_mark() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_record_reads_as_absent() {
        #[derive(Deserialize)]
        struct M {
            #[serde(default, deserialize_with = "lenient")]
            peak_memory: Option<PeakMemory>,
        }
        let read = |s: &str| serde_json::from_str::<M>(s).unwrap().peak_memory;
        let known = r#"{"peak_memory": {"format": 1, "bytes": 5, "scope": "stage"}}"#;
        assert_eq!(read(known).map(|p| p.bytes), Some(5));
        assert_eq!(
            read(r#"{"peak_memory": {"format": 2, "bytes": 5, "scope": "stage"}}"#),
            None
        );
        assert_eq!(
            read(r#"{"peak_memory": {"format": 1, "bytes": 5, "scope": "gpu"}}"#),
            None
        );
        assert_eq!(read("{}"), None);
    }

    #[test]
    fn reads_vm_hwm_in_bytes() {
        let status = "Name:\trudder\nVmPeak:\t  10000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_watch_sees_memory_touched_during_it() {
        let watch = PeakWatch::start();
        let before = watch.peak().unwrap().bytes;
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        let after = watch.peak().unwrap();
        assert!(
            after.bytes >= before + (48 << 20),
            "{before} -> {}",
            after.bytes
        );
        assert_eq!(after.format, PEAK_MEMORY_FORMAT);
    }
}
