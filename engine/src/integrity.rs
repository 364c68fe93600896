//! Integrity of artifact files: checking a directory against the list of files a manifest
//! records, and the read-only bits that keep committed artifacts from being edited by accident.
//!
//! A check is either cheap or full. The cheap one compares each file's size, inode, and
//! modification and change times with what was recorded when the file was committed (or last
//! hashed): an edit, an append, a truncation or a file replaced by another all change at least
//! one of them, and the change time cannot be set back by a program. Only a file whose record
//! differs is hashed again with BLAKE3. The full check hashes every file.
//!
//! Nothing here knows where the file list came from: the local store checks its artifacts
//! against their `manifest.json`, and a copy fetched from elsewhere can be checked against the
//! manifest it came with the same way ([`check_files`] with [`VerifyMode::Full`]).
//!
//! Not owned here: where artifacts live, quarantine and the manifest format (`store.rs`).

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::{hash_file, list_files};

/// What the cheap check compares, besides the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub inode: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl FileStat {
    pub fn of(metadata: &std::fs::Metadata) -> FileStat {
        let ns = |secs: i64, nanos: i64| secs.saturating_mul(1_000_000_000).saturating_add(nanos);
        FileStat {
            inode: metadata.ino(),
            mtime_ns: ns(metadata.mtime(), metadata.mtime_nsec()),
            ctime_ns: ns(metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// One file an artifact must hold: its name relative to the artifact, size and BLAKE3, and the
/// stat recorded when it was committed (absent in artifacts of layout 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub blake3: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<FileStat>,
}

/// How thoroughly an artifact is checked before it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// Size and stat against the record; BLAKE3 only for files whose record differs.
    #[default]
    Cheap,
    /// BLAKE3 of every file, every time.
    Full,
}

/// Something wrong with an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Missing {
        file: String,
    },
    DigestMismatch {
        file: String,
    },
    /// A file in the directory that the manifest does not list.
    Unexpected {
        file: String,
    },
    Unreadable {
        file: String,
        error: String,
    },
    /// The manifest itself cannot be read or does not describe this artifact.
    Manifest {
        message: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { file } => write!(f, "file {file}: missing"),
            Problem::DigestMismatch { file } => write!(f, "file {file}: digest mismatch"),
            Problem::Unexpected { file } => write!(f, "file {file}: not in the manifest"),
            Problem::Unreadable { file, error } => write!(f, "file {file}: {error}"),
            Problem::Manifest { message } => write!(f, "manifest.json: {message}"),
        }
    }
}

/// The outcome of [`check_files`].
#[derive(Debug, Default)]
pub struct FileCheck {
    pub problems: Vec<Problem>,
    /// Files whose stat differed from the record but whose content was hashed and matches,
    /// with their current stat: remembering it keeps the next check cheap.
    pub rehashed: Vec<(String, FileStat)>,
    /// Bytes hashed.
    pub hashed_bytes: u64,
}

/// Checks the files under `dir` against `files`. `known` gives a stat that was verified after
/// the commit (for files whose directory was copied or restored); names in `ignore` may be in
/// the directory without being listed.
pub fn check_files(
    dir: &Path,
    files: &[FileEntry],
    mode: VerifyMode,
    known: &dyn Fn(&str) -> Option<FileStat>,
    ignore: &[&str],
) -> FileCheck {
    let mut check = FileCheck::default();
    for entry in files {
        // A manifest from elsewhere must not make the check read outside the directory.
        let plain = !entry.name.is_empty()
            && Path::new(&entry.name)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            check.problems.push(Problem::Manifest {
                message: format!(
                    "file name `{}` is not a path inside the artifact",
                    entry.name
                ),
            });
            continue;
        }
        let path = dir.join(&entry.name);
        let metadata = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => {
                check.problems.push(Problem::Missing {
                    file: entry.name.clone(),
                });
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                check.problems.push(Problem::Missing {
                    file: entry.name.clone(),
                });
                continue;
            }
            Err(e) => {
                check.problems.push(Problem::Unreadable {
                    file: entry.name.clone(),
                    error: e.to_string(),
                });
                continue;
            }
        };
        let stat = FileStat::of(&metadata);
        let unchanged = metadata.len() == entry.size
            && (entry.stat == Some(stat) || known(&entry.name) == Some(stat));
        if mode == VerifyMode::Cheap && unchanged {
            continue;
        }
        check.hashed_bytes += metadata.len();
        match hash_file(&path) {
            Ok(digest) if digest == entry.blake3 => {
                if !unchanged {
                    check.rehashed.push((entry.name.clone(), stat));
                }
            }
            Ok(_) => check.problems.push(Problem::DigestMismatch {
                file: entry.name.clone(),
            }),
            Err(e) => check.problems.push(Problem::Unreadable {
                file: entry.name.clone(),
                error: e.to_string(),
            }),
        }
    }
    let listed: BTreeSet<&str> = files.iter().map(|f| f.name.as_str()).collect();
    match list_files(dir) {
        Ok(present) => {
            for name in present {
                if !listed.contains(name.as_str()) && !ignore.contains(&name.as_str()) {
                    check.problems.push(Problem::Unexpected { file: name });
                }
            }
        }
        Err(e) => check.problems.push(Problem::Unreadable {
            file: ".".into(),
            error: e.to_string(),
        }),
    }
    check
}

/// Removes the write bits of every file and directory under `dir` (and of `dir`), deepest first
/// so that a directory is closed only once its content is.
pub fn make_read_only(dir: &Path) -> io::Result<()> {
    set_writable(dir, false)
}

/// Gives the owner write access to every directory under `dir` again (files keep their bits:
/// removing a file needs only its directory to be writable).
pub fn make_dirs_writable(dir: &Path) -> io::Result<()> {
    let metadata = std::fs::symlink_metadata(dir)?;
    if !metadata.is_dir() {
        return Ok(());
    }
    chmod(dir, &metadata, true)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_dirs_writable(&entry.path())?;
        }
    }
    Ok(())
}

/// Makes every file and directory under `dir` writable by its owner (a quarantined artifact is
/// no longer immutable: the user inspects it and deletes it).
pub fn make_writable(dir: &Path) -> io::Result<()> {
    set_writable(dir, true)
}

fn set_writable(path: &Path, writable: bool) -> io::Result<()> {
    let metadata = std::fs::symlink_metadata(path)?;
    if metadata.file_type().is_symlink() {
        return Ok(());
    }
    if metadata.is_dir() {
        if writable {
            chmod(path, &metadata, true)?;
        }
        for entry in std::fs::read_dir(path)? {
            set_writable(&entry?.path(), writable)?;
        }
        if !writable {
            chmod(path, &metadata, false)?;
        }
        Ok(())
    } else {
        chmod(path, &metadata, writable)
    }
}

fn chmod(path: &Path, metadata: &std::fs::Metadata, writable: bool) -> io::Result<()> {
    let mode = metadata.permissions().mode();
    let new = if writable {
        mode | 0o200
    } else {
        mode & !0o222
    };
    if new == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(new))
}

/// Removes a directory tree that may be read-only.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    match make_dirs_writable(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    std::fs::remove_dir_all(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn entry(dir: &Path, name: &str) -> FileEntry {
        let path = dir.join(name);
        let metadata = std::fs::metadata(&path).unwrap();
        FileEntry {
            name: name.into(),
            size: metadata.len(),
            blake3: hash_file(&path).unwrap(),
            stat: Some(FileStat::of(&metadata)),
        }
    }

    fn none(_: &str) -> Option<FileStat> {
        None
    }

    #[test]
    fn an_untouched_directory_passes_without_hashing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "alpha").unwrap();
        let files = vec![entry(dir.path(), "a.txt")];
        let check = check_files(dir.path(), &files, VerifyMode::Cheap, &none, &[]);
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert_eq!(check.hashed_bytes, 0);
        let full = check_files(dir.path(), &files, VerifyMode::Full, &none, &[]);
        assert!(full.problems.is_empty());
        assert_eq!(full.hashed_bytes, 5);
    }

    #[test]
    fn edits_appends_and_extra_files_are_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "alpha").unwrap();
        std::fs::write(dir.path().join("b.txt"), "beta").unwrap();
        let files = vec![entry(dir.path(), "a.txt"), entry(dir.path(), "b.txt")];
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("a.txt"))
            .unwrap()
            .write_all(b"\nmore")
            .unwrap();
        std::fs::remove_file(dir.path().join("b.txt")).unwrap();
        std::fs::write(dir.path().join("c.txt"), "gamma").unwrap();
        let check = check_files(dir.path(), &files, VerifyMode::Cheap, &none, &[]);
        let shown: Vec<String> = check.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "file a.txt: digest mismatch",
                "file b.txt: missing",
                "file c.txt: not in the manifest"
            ]
        );
    }

    /// An edit that keeps the size and restores the modification time still changes the
    /// change time, so the cheap check hashes the file and finds it.
    #[test]
    fn a_same_size_edit_with_the_old_mtime_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, "alpha").unwrap();
        let files = vec![entry(dir.path(), "a.txt")];
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "ALPHA").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        let check = check_files(dir.path(), &files, VerifyMode::Cheap, &none, &[]);
        assert_eq!(
            check.problems,
            [Problem::DigestMismatch {
                file: "a.txt".into()
            }]
        );
    }

    #[test]
    fn a_copied_file_is_hashed_once_and_its_new_stat_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, "alpha").unwrap();
        let files = vec![entry(dir.path(), "a.txt")];
        // Same content under a new inode (a restored backup, a copied store).
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "alpha").unwrap();
        let check = check_files(dir.path(), &files, VerifyMode::Cheap, &none, &[]);
        assert!(check.problems.is_empty());
        assert_eq!(check.rehashed.len(), 1);
        let (_, stat) = check.rehashed[0];
        let again = check_files(dir.path(), &files, VerifyMode::Cheap, &|_| Some(stat), &[]);
        assert!(again.problems.is_empty());
        assert_eq!(again.hashed_bytes, 0);
    }

    #[test]
    fn manifests_cannot_point_outside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let outside = FileEntry {
            name: "../secret".into(),
            size: 1,
            blake3: "0".repeat(64),
            stat: None,
        };
        let check = check_files(dir.path(), &[outside], VerifyMode::Full, &none, &[]);
        assert_eq!(check.hashed_bytes, 0);
        assert!(matches!(check.problems[0], Problem::Manifest { .. }));
    }

    #[test]
    fn read_only_trees_can_still_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("t");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/x"), "x").unwrap();
        make_read_only(&tree).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tree.join("sub/x")) & 0o222, 0);
        assert_eq!(mode(&tree.join("sub")) & 0o222, 0);
        assert_eq!(mode(&tree) & 0o222, 0);
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        remove_tree(&tree).unwrap();
    }
}
