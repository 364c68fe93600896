//! The one place user-facing output goes through: `--quiet` silences the chatter, while
//! machine-readable output (`--json`, `--path`) is always printed.

use std::io::Write;

#[derive(Debug, Clone, Copy)]
pub struct Printer {
    quiet: bool,
}

impl Printer {
    pub fn new(quiet: bool) -> Self {
        Self { quiet }
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// Human-readable output on stdout.
    pub fn out(&self, text: impl AsRef<str>) {
        if !self.quiet {
            let _ = writeln!(std::io::stdout(), "{}", text.as_ref());
        }
    }

    /// Machine-readable output: printed even with `--quiet`.
    pub fn data(&self, text: impl AsRef<str>) {
        let _ = writeln!(std::io::stdout(), "{}", text.as_ref());
    }

    /// Status lines on stderr.
    pub fn status(&self, text: impl AsRef<str>) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr(), "{}", text.as_ref());
        }
    }
}
