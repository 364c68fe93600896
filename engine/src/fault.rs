//! Injected faults, for the tests that prove the store's crash safety.
//!
//! The store's write paths call [`hit`] at each step of their protocols (a temporary file
//! written, synced, renamed; an artifact's manifest written, synced, published; the lockfile
//! replaced). In a debug build (what `cargo test` builds, and so the `rudder` binary the
//! end-to-end tests drive) the `RUDDER_FAULT` environment variable can make one of those steps
//! fail or kill the process; a release build compiles the hook to nothing and never reads the
//! variable. A cargo feature would do the same but build the engine, and the Burn crate on top
//! of it, a second time for the tests.
//!
//! ```text
//! RUDDER_FAULT=ACTION@POINT[:FILE]
//!   ACTION  kill     SIGKILL this process at the point (no destructor, no flush runs)
//!           enospc   the step fails with "No space left on device"
//!           eio      the step fails with an I/O error
//!           short    a write stops halfway through the bytes, then fails with an I/O error
//!   POINT   commit.hash  commit.manifest  commit.sync  commit.rename  commit.published
//!           atomic.write  atomic.sync  atomic.rename  (write_atomic; FILE picks the file by name)
//!           sandbox.abi      (any error: behave as a kernel without Landlock)
//! ```
//!
//! Unit tests in this crate set a fault for their own thread with [`inject`] instead, so that
//! tests running in parallel do not see each other's faults.

use std::io;
use std::path::Path;

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill,
    NoSpace,
    Io,
    Short,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub action: Action,
    pub point: String,
    /// Only when the file written has this name.
    pub file: Option<String>,
}

impl Fault {
    /// Parses `ACTION@POINT[:FILE]`.
    pub fn parse(spec: &str) -> Option<Fault> {
        let (action, rest) = spec.trim().split_once('@')?;
        let action = match action {
            "kill" => Action::Kill,
            "enospc" => Action::NoSpace,
            "eio" => Action::Io,
            "short" => Action::Short,
            _ => return None,
        };
        let (point, file) = match rest.split_once(':') {
            Some((point, file)) => (point, Some(file.to_owned())),
            None => (rest, None),
        };
        Some(Fault {
            action,
            point: point.to_owned(),
            file,
        })
    }

    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    fn applies(&self, point: &str, file: Option<&Path>) -> bool {
        self.point == point
            && match &self.file {
                None => true,
                Some(name) => file
                    .and_then(Path::file_name)
                    .is_some_and(|n| n.to_string_lossy() == name.as_str()),
            }
    }
}

#[cfg(test)]
thread_local! {
    static INJECTED: std::cell::RefCell<Option<Fault>> = const { std::cell::RefCell::new(None) };
}

/// Sets (or with `None` clears) the fault of the current thread, for unit tests.
#[cfg(test)]
pub fn inject(fault: Option<&str>) {
    let fault = fault.map(|f| Fault::parse(f).expect("a valid fault spec"));
    INJECTED.with(|f| *f.borrow_mut() = fault);
}

#[cfg(debug_assertions)]
fn active(point: &str, file: Option<&Path>) -> Option<Fault> {
    #[cfg(test)]
    {
        if let Some(fault) = INJECTED.with(|f| f.borrow().clone()) {
            return fault.applies(point, file).then_some(fault);
        }
    }
    let fault = Fault::parse(&std::env::var("RUDDER_FAULT").ok()?)?;
    fault.applies(point, file).then_some(fault)
}

#[cfg(not(debug_assertions))]
#[inline(always)]
fn active(_point: &str, _file: Option<&Path>) -> Option<Fault> {
    None
}

fn fail(fault: &Fault) -> io::Error {
    match fault.action {
        Action::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        _ => io::Error::from_raw_os_error(libc::EIO),
    }
}

fn kill() -> ! {
    // SAFETY: raising a signal has no memory-safety preconditions.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
    unreachable!("SIGKILL cannot be caught")
}

/// A step of a write protocol: `Err` when a fault is injected here, and never returns under
/// `kill`.
pub fn hit(point: &str, file: Option<&Path>) -> io::Result<()> {
    match active(point, file) {
        None => Ok(()),
        Some(fault) if fault.action == Action::Kill => kill(),
        Some(fault) => Err(fail(&fault)),
    }
}

/// Writes all of `bytes` to `out`, unless a fault at `point` makes the write fail (a `short`
/// fault writes half of them first, as a disk that fills mid-file does).
pub fn write_all(
    point: &str,
    file: Option<&Path>,
    out: &mut impl io::Write,
    bytes: &[u8],
) -> io::Result<()> {
    match active(point, file) {
        None => out.write_all(bytes),
        Some(fault) => match fault.action {
            Action::Kill => {
                out.write_all(&bytes[..bytes.len() / 2])?;
                let _ = out.flush();
                kill()
            }
            Action::Short => {
                out.write_all(&bytes[..bytes.len() / 2])?;
                Err(fail(&fault))
            }
            _ => Err(fail(&fault)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            Fault::parse("enospc@atomic.write:r.lock"),
            Some(Fault {
                action: Action::NoSpace,
                point: "atomic.write".into(),
                file: Some("r.lock".into())
            })
        );
        assert_eq!(Fault::parse("explode@x"), None);
        assert_eq!(Fault::parse("kill"), None);
    }

    #[test]
    fn faults_apply_to_their_point_and_file_only() {
        inject(Some("eio@atomic.sync:a.lock"));
        assert!(hit("atomic.sync", Some(Path::new("/x/b.lock"))).is_ok());
        assert!(hit("atomic.write", Some(Path::new("/x/a.lock"))).is_ok());
        let err = hit("atomic.sync", Some(Path::new("/x/a.lock"))).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        inject(Some("short@commit.manifest"));
        let mut out = Vec::new();
        assert!(write_all("commit.manifest", None, &mut out, b"abcdef").is_err());
        assert_eq!(out, b"abc");
        inject(None);
        assert!(hit("commit.manifest", None).is_ok());
    }
}
