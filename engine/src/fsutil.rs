//! Small filesystem helpers with the crash-safety the store relies on.

use std::fs::File;
use std::path::Path;

use crate::error::EngineError;
use crate::fault;

/// Write a file so that readers see either the old or the new content, never a torn one:
/// write a sibling temporary file, flush it to disk, rename it over the target, then flush the
/// directory so that the rename itself survives a power cut.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A recognisable name: a temporary file left by a killed process says what it was.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| {
            EngineError::io(format!("creating a temporary file in {}", dir.display()), e)
        })?;
    let write_err = |e| EngineError::io(format!("writing {}", path.display()), e);
    fault::write_all("atomic.write", Some(path), tmp.as_file_mut(), bytes).map_err(write_err)?;
    fault::hit("atomic.sync", Some(path))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(write_err)?;
    fault::hit("atomic.rename", Some(path))
        .map_err(|e| EngineError::io(format!("replacing {}", path.display()), e))?;
    tmp.persist(path)
        .map_err(|e| EngineError::io(format!("replacing {}", path.display()), e.error))?;
    // Best effort: not every filesystem can sync a directory.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every failure before the rename leaves the old content and no temporary file.
    #[test]
    fn a_failed_atomic_write_keeps_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        write_atomic(&path, b"old content").unwrap();
        for fault in [
            "enospc@atomic.write",
            "short@atomic.write",
            "eio@atomic.sync",
            "eio@atomic.rename",
        ] {
            fault::inject(Some(fault));
            let err = write_atomic(&path, b"new content, longer").unwrap_err();
            fault::inject(None);
            assert!(err.to_string().contains("r.lock"), "{fault}: {err}");
            assert_eq!(std::fs::read(&path).unwrap(), b"old content", "{fault}");
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["r.lock"], "{fault} left a temporary file");
        }
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }
}
