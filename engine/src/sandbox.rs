//! Confinement of the processes a stage starts, with Landlock (Linux 5.13 and later), so that a
//! command reads only what its key covers.
//!
//! A confined process may read (and execute) only the paths of a [`Policy`]: the stage's
//! declared inputs and dependency files, the system's read-only locations, and the installation
//! prefixes of the programs it runs; it may write only into its output, work and temporary
//! directories; TCP `connect` and `bind` fail unless the network is allowed (Landlock ABI 4,
//! Linux 6.7; UDP is not covered by Landlock). The rules are built in the parent and applied in
//! the child between `fork` and `exec`, so rudder itself is never confined.
//!
//! Where the kernel has no Landlock, [`prepare`] says so and the command runs unconfined; the
//! manifest's [`SandboxRecord`] keeps what was enforced, so an artifact built without a sandbox
//! is known as such.
//!
//! Not owned here: which paths a command declares (the `command` kind in `command.rs`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// How a stage's process was confined, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// `on`, `recipe-dir` or `off`: the recipe's setting.
    pub mode: String,
    /// Whether the kernel enforced the file rules.
    pub enforced: bool,
    /// Whether TCP connections were allowed (asked for, or not enforceable).
    pub network: bool,
    /// The kernel's Landlock ABI version (0: none).
    pub landlock_abi: i32,
    /// What was not enforced and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What a confined process may touch.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Read and execute beneath these.
    pub read: Vec<PathBuf>,
    /// Everything beneath these.
    pub write: Vec<PathBuf>,
    /// Allow TCP connect and bind.
    pub network: bool,
}

/// Directories every program needs to start: binaries, libraries, configuration, `/proc` and
/// `/sys` (read-only).
pub const SYSTEM_READ: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/sys",
];

/// The character devices a program may read and write: never block devices or terminals.
pub const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Rules ready to apply to a child process.
#[derive(Debug)]
pub struct Prepared {
    ruleset: Option<OwnedFd>,
    pub record: SandboxRecord,
}

/// The kernel's Landlock ABI version; 0 when it has none (and in a debug build run with
/// `RUDDER_FAULT=eio@sandbox.abi`, which the tests of the fallback use).
pub fn landlock_abi() -> i32 {
    if crate::fault::hit("sandbox.abi", None).is_err() {
        return 0;
    }
    #[cfg(target_os = "linux")]
    {
        const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
        // SAFETY: with a null attribute and size 0, this syscall only returns the ABI version.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        i32::try_from(abi).unwrap_or(0).max(0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// Builds the Landlock rules of `policy`. `mode` is the recipe's setting, for the record.
pub fn prepare(policy: &Policy, mode: &str) -> Result<Prepared, String> {
    let abi_version = landlock_abi();
    let mut record = SandboxRecord {
        mode: mode.to_owned(),
        enforced: false,
        network: true,
        landlock_abi: abi_version,
        note: None,
    };
    if abi_version < 1 {
        record.note = Some("this kernel has no Landlock: the command ran unconfined".into());
        return Ok(Prepared {
            ruleset: None,
            record,
        });
    }
    let ruleset = build(policy, abi_version).map_err(|e| format!("sandbox: {e}"))?;
    record.enforced = true;
    record.network = policy.network || abi_version < 4;
    if !policy.network && abi_version < 4 {
        record.note = Some(format!(
            "Landlock ABI {abi_version} cannot restrict the network (needs ABI 4, Linux 6.7)"
        ));
    }
    Ok(Prepared {
        ruleset: Some(ruleset),
        record,
    })
}

#[cfg(target_os = "linux")]
fn build(policy: &Policy, abi_version: i32) -> Result<OwnedFd, landlock::RulesetError> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr,
        path_beneath_rules,
    };
    // The newest rights this code knows; older kernels get what they support (best effort),
    // and `prepare` records what that means.
    let abi = ABI::V5;
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(abi))?;
    if !policy.network && abi_version >= 4 {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
    }
    let read: Vec<&Path> = SYSTEM_READ
        .iter()
        .map(Path::new)
        .chain(policy.read.iter().map(PathBuf::as_path))
        .collect();
    let created = ruleset
        .create()?
        .add_rules(path_beneath_rules(read, AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(&policy.write, AccessFs::from_all(abi)))?
        .add_rules(path_beneath_rules(
            DEVICES,
            AccessFs::from_read(abi) | AccessFs::WriteFile,
        ))?;
    let fd: Option<OwnedFd> = created.into();
    Ok(fd.expect("a kernel with Landlock gives a ruleset descriptor"))
}

#[cfg(not(target_os = "linux"))]
fn build(_policy: &Policy, _abi_version: i32) -> Result<OwnedFd, String> {
    unreachable!("no Landlock outside Linux: the ABI probe says 0")
}

impl Prepared {
    /// Makes `command`'s child confine itself before it executes.
    pub fn apply(&self, command: &mut Command) {
        #[cfg(target_os = "linux")]
        if let Some(ruleset) = &self.ruleset {
            use std::os::unix::process::CommandExt;
            let fd = ruleset.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec and makes only two
            // async-signal-safe system calls, allocating nothing. `fd` stays open in the child
            // until exec (it is close-on-exec) because `self` outlives the spawn.
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = command;
    }
}

/// Installation prefixes of the programs a command names: for each word that is a program on
/// `path` (the command's `PATH`), the directory it is in and, when that is a `bin`, `sbin` or
/// `shims` directory, the one above it (where an interpreter keeps its library: `/usr`, a
/// virtualenv, a conda environment, the root of a version manager such as pyenv or asdf whose
/// shims pick the interpreter). Symbolic links are followed to the real program as well, so a
/// virtualenv's `python3` also grants the prefix of the interpreter it links to. The root and
/// `home` themselves are never granted whole.
pub fn program_prefixes(command: &str, path: &str, home: Option<&Path>) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    let mut add = |dir: &Path| {
        let mut grant = |p: &Path| {
            if p != Path::new("/") && Some(p) != home && !prefixes.iter().any(|q| q == p) {
                prefixes.push(p.to_path_buf());
            }
        };
        grant(dir);
        if matches!(
            dir.file_name().and_then(|n| n.to_str()),
            Some("bin" | "sbin" | "shims")
        ) && let Some(parent) = dir.parent()
        {
            grant(parent);
        }
    };
    let words = command
        .split(|c: char| c.is_whitespace() || ";|&()<>`$\"'".contains(c))
        .filter(|w| !w.is_empty() && !w.contains('/') && !w.contains('='));
    for word in words {
        for dir in std::env::split_paths(path) {
            if !dir.is_absolute() {
                continue;
            }
            let candidate = dir.join(word);
            if !is_executable(&candidate) {
                continue;
            }
            add(&dir);
            if let Ok(real) = candidate.canonicalize()
                && let Some(real_dir) = real.parent()
            {
                add(real_dir);
            }
            break;
        }
    }
    prefixes
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Paths that a failed command's stderr says it was denied (`Permission denied`, Python's
/// `[Errno 13]`), as written, that the policy does not allow: the likely undeclared reads or
/// writes. Only a guess from the messages programs print; Landlock itself reports nothing to
/// the process beyond `EACCES`.
pub fn denied_paths(stderr: &[String], cwd: &Path, policy: &Policy) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for line in stderr {
        let lower = line.to_lowercase();
        if !(lower.contains("permission denied") || lower.contains("errno 13")) {
            continue;
        }
        let tokens = line
            .split(|c: char| c.is_whitespace() || "'\"`:,()[]{}<>".contains(c))
            .filter(|t| t.contains('/') || cwd.join(t).exists())
            .filter(|t| !t.is_empty() && *t != "/");
        for token in tokens {
            let path = cwd.join(token);
            if !allowed(&path, policy) && !found.iter().any(|f| f == token) {
                found.push(token.to_owned());
            }
        }
    }
    found
}

fn allowed(path: &Path, policy: &Policy) -> bool {
    let path = normalize(path);
    let under = |root: &Path| path.starts_with(normalize(root));
    SYSTEM_READ.iter().any(|r| under(Path::new(r)))
        || DEVICES.iter().any(|r| under(Path::new(r)))
        || policy.read.iter().any(|r| under(r))
        || policy.write.iter().any(|r| under(r))
}

/// `path` with symbolic links resolved where it exists (its parent where it does not yet).
fn normalize(path: &Path) -> PathBuf {
    if let Ok(real) = path.canonicalize() {
        return real;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => normalize(parent).join(name),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_of_named_programs() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("venv");
        std::fs::create_dir_all(env.join("bin")).unwrap();
        let tool = env.join("bin/tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:/usr/bin", env.join("bin").display());
        let prefixes = program_prefixes("tool a.txt | sh -c 'x'", &path, None);
        assert!(prefixes.contains(&env), "{prefixes:?}");
        assert!(prefixes.contains(&PathBuf::from("/usr")), "{prefixes:?}");
        assert!(!prefixes.contains(&PathBuf::from("/")));
        // A program in a `bin` directory of the home grants that directory, not the home.
        let home_prefixes = program_prefixes("tool", &path, Some(&env));
        assert!(!home_prefixes.contains(&env), "{home_prefixes:?}");
        assert!(home_prefixes.contains(&env.join("bin")));
    }

    #[test]
    fn denied_paths_come_from_the_messages_of_common_programs() {
        let dir = tempfile::tempdir().unwrap();
        let allowed_dir = dir.path().join("declared");
        std::fs::create_dir_all(&allowed_dir).unwrap();
        std::fs::write(dir.path().join("secret.txt"), "x").unwrap();
        let policy = Policy {
            read: vec![allowed_dir.clone()],
            ..Policy::default()
        };
        let lines = [
            "cat: secret.txt: Permission denied".to_owned(),
            format!(
                "PermissionError: [Errno 13] Permission denied: '{}/a'",
                allowed_dir.display()
            ),
            "sh: 1: cannot create /root/out.txt: Permission denied".to_owned(),
            "Traceback (most recent call last):".to_owned(),
        ];
        assert_eq!(
            denied_paths(&lines, dir.path(), &policy),
            ["secret.txt", "/root/out.txt"]
        );
    }
}
