//! Recipe errors that point at their source: a message, labelled locations, an optional hint.
//!
//! Errors are collected rather than returned at the first one, so that a user fixing a recipe
//! sees every problem at once. Rendering to text happens at the edge (the CLI); this module only
//! carries what a renderer needs, and implements `miette::Diagnostic` for library callers.

use std::fmt;
use std::sync::Arc;

pub use crate::source::Loc;
use crate::source::{Sources, TomlError};

#[derive(Debug, Clone)]
pub struct Label {
    pub loc: Loc,
    pub text: String,
}

/// One recipe error.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub message: String,
    /// The first label is the primary location.
    pub labels: Vec<Label>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            labels: Vec::new(),
            help: None,
        }
    }

    pub fn with_label(mut self, loc: Loc, text: impl Into<String>) -> Self {
        self.labels.push(Label {
            loc,
            text: text.into(),
        });
        self
    }

    pub fn with_optional_label(self, loc: Option<Loc>, text: impl Into<String>) -> Self {
        match loc {
            Some(loc) => self.with_label(loc, text),
            None => self,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_optional_help(mut self, help: Option<String>) -> Self {
        self.help = help.or(self.help);
        self
    }
}

impl From<TomlError> for Diagnostic {
    fn from(err: TomlError) -> Self {
        Diagnostic::new(err.message).with_label(err.loc, "here")
    }
}

/// Every error found in a recipe, with the sources they point into.
#[derive(Debug, Clone, thiserror::Error)]
pub struct RecipeErrors {
    pub sources: Arc<Sources>,
    pub errors: Vec<Diagnostic>,
}

impl RecipeErrors {
    pub fn new(sources: Arc<Sources>, errors: Vec<Diagnostic>) -> Self {
        Self { sources, errors }
    }

    pub fn single(sources: Arc<Sources>, error: Diagnostic) -> Self {
        Self::new(sources, vec![error])
    }

    /// `file:line:col` of a diagnostic's primary label.
    pub fn position(&self, diagnostic: &Diagnostic) -> Option<String> {
        let label = diagnostic.labels.first()?;
        let (line, col) = self.sources.line_col(&label.loc);
        Some(format!(
            "{}:{line}:{col}",
            self.sources.get(label.loc.source).name
        ))
    }
}

impl fmt::Display for RecipeErrors {
    /// Plain one-line-per-error form; the CLI renders the rich form with source excerpts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match self.position(diagnostic) {
                Some(pos) => write!(f, "{pos}: {}", diagnostic.message)?,
                None => write!(f, "{}", diagnostic.message)?,
            }
            if let Some(help) = &diagnostic.help {
                write!(f, " ({help})")?;
            }
        }
        Ok(())
    }
}

/// The miette view of one diagnostic, for callers that render with miette.
#[derive(Debug)]
pub struct MietteDiagnostic<'a> {
    errors: &'a RecipeErrors,
    diagnostic: &'a Diagnostic,
}

impl fmt::Display for MietteDiagnostic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diagnostic.message)
    }
}

impl std::error::Error for MietteDiagnostic<'_> {}

impl miette::Diagnostic for MietteDiagnostic<'_> {
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.diagnostic
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        let label = self.diagnostic.labels.first()?;
        Some(&self.errors.sources.get(label.loc.source).text as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        let primary = self.diagnostic.labels.first()?.loc.source;
        Some(Box::new(
            self.diagnostic
                .labels
                .iter()
                .filter(move |l| l.loc.source == primary)
                .map(|l| {
                    miette::LabeledSpan::new_with_span(Some(l.text.clone()), l.loc.span.clone())
                }),
        ))
    }
}

impl RecipeErrors {
    pub fn miette(&self) -> impl Iterator<Item = MietteDiagnostic<'_>> {
        self.errors.iter().map(move |diagnostic| MietteDiagnostic {
            errors: self,
            diagnostic,
        })
    }
}

/// "did you mean `x`?" for the closest candidate within a small edit distance.
pub fn did_you_mean<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let best = candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(wrong, c), c))
        .filter(|(distance, c)| *distance <= (c.len().max(wrong.len()) / 3).max(1))
        .min_by_key(|(distance, c)| (*distance, c.len()))?;
    Some(format!("did you mean `{}`?", best.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_name_hint() {
        let names = ["beta", "loss_type", "learning_rate"];
        assert_eq!(
            did_you_mean("bta", names).as_deref(),
            Some("did you mean `beta`?")
        );
        assert_eq!(
            did_you_mean("learning_rat", names).as_deref(),
            Some("did you mean `learning_rate`?")
        );
        assert_eq!(did_you_mean("zzzzzz", names), None);
    }

    #[test]
    fn display_has_file_line_col() {
        let mut sources = Sources::default();
        let id = sources.add("r.toml", "a = 1\nb = 2\n");
        let errors = RecipeErrors::single(
            Arc::new(sources),
            Diagnostic::new("bad b").with_label(Loc::new(id, 6..7), "here"),
        );
        assert_eq!(errors.to_string(), "r.toml:2:1: bad b");
    }
}
