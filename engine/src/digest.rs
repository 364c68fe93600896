//! Content digests of files and directories, with a cache keyed by path, size and modification
//! time so that unchanged large files (model weights, datasets) are not re-read on every plan.
//!
//! A cached digest is only reused when the size and the nanosecond modification time both
//! match; anything else re-hashes. The cache is a JSON file in the store, written atomically.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: u128,
    blake3: String,
}

/// Digests of files, remembered across runs.
#[derive(Debug, Default)]
pub struct DigestCache {
    /// Where the cache lives; `None` keeps it in memory only.
    file: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, Entry>>,
    dirty: Mutex<bool>,
}

impl DigestCache {
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads the cache file if it exists; an unreadable cache is ignored (it is only a cache).
    pub fn load(file: PathBuf) -> Self {
        let entries = std::fs::read(&file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            file: Some(file),
            entries: Mutex::new(entries),
            dirty: Mutex::new(false),
        }
    }

    /// Writes the cache back if anything was added.
    pub fn save(&self) -> Result<(), EngineError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !*self.dirty.lock().expect("digest cache lock") {
            return Ok(());
        }
        let Some(dir) = file.parent() else {
            return Ok(());
        };
        if !dir.exists() {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&*self.entries.lock().expect("digest cache lock"))
            .expect("digest cache serialises");
        crate::fsutil::write_atomic(file, &bytes)
    }

    /// BLAKE3 of a file's bytes, as hex.
    pub fn file(&self, path: &Path) -> Result<String, EngineError> {
        let io_err = |source| EngineError::Io {
            context: format!("reading {}", path.display()),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(io_err)?;
        let mtime_ns = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos());
        let id = std::path::absolute(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .to_string_lossy()
            .into_owned();
        if let Some(mtime_ns) = mtime_ns {
            let entries = self.entries.lock().expect("digest cache lock");
            if let Some(entry) = entries.get(&id)
                && entry.size == metadata.len()
                && entry.mtime_ns == mtime_ns
            {
                return Ok(entry.blake3.clone());
            }
        }
        let digest = hash_file(path).map_err(io_err)?;
        if let Some(mtime_ns) = mtime_ns {
            self.entries.lock().expect("digest cache lock").insert(
                id,
                Entry {
                    size: metadata.len(),
                    mtime_ns,
                    blake3: digest.clone(),
                },
            );
            *self.dirty.lock().expect("digest cache lock") = true;
        }
        Ok(digest)
    }

    /// Digests of every file under a directory, by relative path (sorted, `/`-separated).
    pub fn tree(&self, dir: &Path) -> Result<Vec<(String, String)>, EngineError> {
        let mut digests = Vec::new();
        for relative in list_files(dir)? {
            let digest = self.file(&dir.join(&relative))?;
            digests.push((relative, digest));
        }
        Ok(digests)
    }
}

/// BLAKE3 of a file, streamed (memory-mapped where large: BLAKE3 then hashes on all cores).
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let size = std::fs::metadata(path)?.len();
    if size >= 16 * 1024 * 1024 {
        hasher.update_mmap_rayon(path)?;
    } else {
        let mut file = File::open(path)?;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Every regular file under `dir`, as sorted relative paths with `/` separators.
pub fn list_files(dir: &Path) -> Result<Vec<String>, EngineError> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                walk(base, &path, out)?;
            } else if file_type.is_file() || path.is_file() {
                let relative = path
                    .strip_prefix(base)
                    .expect("walked paths are under the base");
                let parts: Vec<String> = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files).map_err(|source| EngineError::Io {
        context: format!("listing {}", dir.display()),
        source,
    })?;
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_reuses_digest_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.txt");
        std::fs::write(&path, "hello").unwrap();
        let cache = DigestCache::load(dir.path().join("digests.json"));
        let first = cache.file(&path).unwrap();
        assert_eq!(first, blake3::hash(b"hello").to_hex().to_string());
        cache.save().unwrap();
        let reloaded = DigestCache::load(dir.path().join("digests.json"));
        assert_eq!(reloaded.file(&path).unwrap(), first);
        std::fs::write(&path, "hello, world").unwrap();
        assert_eq!(
            reloaded.file(&path).unwrap(),
            blake3::hash(b"hello, world").to_hex().to_string()
        );
    }

    #[test]
    fn tree_lists_nested_files_sorted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.txt"), "b").unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "a").unwrap();
        let cache = DigestCache::in_memory();
        let names: Vec<String> = cache
            .tree(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["b.txt", "sub/a.txt"]);
    }
}
