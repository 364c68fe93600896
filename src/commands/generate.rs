use std::path::PathBuf;

use rudder_engine::Selection;
use rudder_schema::NodeBody;
use rudder_stages::data::{Format, Message, Turns, read_rows};
use rudder_stages::generate::{GenerateOptions, generate};

use crate::ExitStatus;
use crate::cli::GenerateArgs;
use crate::printer::Printer;

pub fn run(args: &GenerateArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let project = super::open(&args.recipe, Some(&args.store))?;
    let Some(node) = project.recipe.node(&args.node) else {
        return Err(rudder_engine::EngineError::Usage(format!(
            "no node named `{}` in the recipe",
            args.node
        ))
        .into());
    };
    let model_dir: PathBuf = match &node.body {
        NodeBody::Model(model) if model.spec.adapter.is_some() => anyhow::bail!(
            "`{}` applies a LoRA adapter, which is merged when a stage reads the model; generate with a stage that trained from it, or `export` it",
            args.node
        ),
        NodeBody::Model(model) => match &model.spec.hf {
            Some(hf) => project.recipe.dir.join(hf),
            None => anyhow::bail!(
                "`{}` is a fresh architecture with no weights yet; generate with a stage that trained it",
                args.node
            ),
        },
        NodeBody::Stage(stage)
            if stage
                .spec
                .produces()
                .satisfies(rudder_schema::kinds::Expect::Model) =>
        {
            let plan = project.plan(&super::registry(), &Selection::default(), None)?;
            let entry = plan
                .entries
                .iter()
                .find(|e| e.name == args.node)
                .expect("every node is planned");
            if !project.store.contains(&entry.key) {
                anyhow::bail!("`{}` is not in the store; run it first", args.node);
            }
            super::refuse_corrupted(entry)?;
            project.store.object_dir(&entry.key)
        }
        _ => {
            return Err(rudder_engine::EngineError::Usage(format!(
                "`{}` is not a model",
                args.node
            ))
            .into());
        }
    };
    let prompts = match &args.data {
        Some(path) => read_prompts(path)?,
        None if args.chat => args
            .prompt
            .iter()
            .map(|p| {
                let system = args.system.iter().map(|s| Message {
                    role: "system".into(),
                    content: s.clone(),
                });
                let user = Message {
                    role: "user".into(),
                    content: p.clone(),
                };
                Turns::Chat(system.chain([user]).collect())
            })
            .collect(),
        None => args.prompt.iter().map(|p| Turns::Text(p.clone())).collect(),
    };
    let backend = super::backend(args.backend.as_deref())?.unwrap_or(project.recipe.meta.backend);
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        ..GenerateOptions::default()
    };
    // The node's precision when it is a stage (a model node's is the recipe's), as the
    // stages that read it run; `--precision` has set both.
    let precision = match project.recipe.node(&args.node).map(|n| &n.body) {
        Some(rudder_schema::NodeBody::Stage(stage)) => stage.precision,
        _ => project.recipe.meta.precision,
    };
    let device = rudder_stages::backend::device(backend)?;
    rudder_stages::precision::check_supported(precision, backend, &device)?;
    let completions = rudder_stages::precision::scoped(precision, || {
        generate(&model_dir, &prompts, &options, backend)
    })?;
    if args.json {
        printer.data(serde_json::to_string_pretty(
            &serde_json::json!({ "completions": completions }),
        )?);
    } else {
        for c in &completions {
            printer.data(format!("{}{}", c.prompt, c.completion));
            printer.out(format!(
                "  [{} tokens, {}]",
                c.completion_ids.len(),
                serde_json::to_value(c.finish_reason)?
                    .as_str()
                    .unwrap_or("")
            ));
        }
    }
    Ok(ExitStatus::Success)
}

/// Prompts from a data file, read as the stages read prompts.
fn read_prompts(path: &std::path::Path) -> anyhow::Result<Vec<Turns>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let format = Format::from_name(&ext.to_ascii_lowercase()).unwrap_or(Format::Jsonl);
    let rows = read_rows(path, format, &Default::default())?;
    Ok(rows.prompts()?)
}
