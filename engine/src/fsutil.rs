//! Small filesystem helpers with the crash-safety the store relies on.

use std::io::Write;
use std::path::Path;

use crate::error::EngineError;

/// Write a file so that readers see either the old or the new content, never a torn one:
/// write a sibling temporary file, flush it to disk, rename it over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| {
        EngineError::io(format!("creating a temporary file in {}", dir.display()), e)
    })?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| EngineError::io(format!("writing {}", path.display()), e))?;
    tmp.persist(path)
        .map_err(|e| EngineError::io(format!("replacing {}", path.display()), e.error))?;
    Ok(())
}

/// This machine's name, for saying who holds a lock on a shared filesystem.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unknown host".to_owned())
}
