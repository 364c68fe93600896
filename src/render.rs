//! Renders recipe diagnostics: `file:line:col`, the source line, a caret, and the hint.

use annotate_snippets::renderer::DecorStyle;
use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};
use rudder_schema::RecipeErrors;

pub fn recipe_errors(errors: &RecipeErrors, color: bool) -> String {
    let renderer = if color {
        Renderer::styled()
    } else {
        Renderer::plain()
    }
    .decor_style(DecorStyle::Ascii);
    let mut out = String::new();
    for diagnostic in &errors.errors {
        let title = Level::ERROR.primary_title(diagnostic.message.as_str());
        let mut group = Group::with_title(title);
        if let Some(primary) = diagnostic.labels.first() {
            let source = errors.sources.get(primary.loc.source);
            let mut snippet = Snippet::source(&*source.text)
                .path(source.name.as_str())
                .fold(true);
            for (i, label) in diagnostic.labels.iter().enumerate() {
                if label.loc.source != primary.loc.source {
                    continue;
                }
                let kind = if i == 0 {
                    AnnotationKind::Primary
                } else {
                    AnnotationKind::Context
                };
                let span = clamp(&label.loc.span, source.text.len());
                snippet = snippet.annotation(kind.span(span).label(label.text.as_str()));
            }
            group = group.element(snippet);
        }
        let mut report = vec![group];
        if let Some(help) = &diagnostic.help {
            report.push(Group::with_title(
                Level::HELP.secondary_title(help.as_str()),
            ));
        }
        out.push_str(&renderer.render(&report));
        out.push_str("\n\n");
    }
    let n = errors.errors.len();
    out.push_str(&format!(
        "error: the recipe has {n} error{}\n",
        if n == 1 { "" } else { "s" }
    ));
    out
}

fn clamp(span: &std::ops::Range<usize>, len: usize) -> std::ops::Range<usize> {
    let start = span.start.min(len);
    let end = span.end.clamp(start, len);
    start..end
}
