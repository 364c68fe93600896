//! Loading recipes: valid ones resolve; each kind of recipe error is reported with its location.

use std::io::Write;
use std::path::PathBuf;

use rudder_schema::{NodeBody, Recipe, RecipeErrors, Target};

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    (dir, path)
}

fn load(text: &str) -> Result<Recipe, RecipeErrors> {
    let (_dir, path) = write(text);
    Recipe::load(&path, &[])
}

fn errors_of(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("recipe should not load:\n{text}"),
        Err(errors) => errors.to_string().lines().map(str::to_owned).collect(),
    }
}

const BASE: &str = r#"
[recipe]
name = "demo"
seed = 7

[datasets.prefs]
path = "prefs.jsonl"

[models.base]
hf = "models/base"

[stages.sft]
kind = "sft"
model = "base"
data = "prefs"

[stages.dpo]
kind = "dpo"
model = "sft"
data = "prefs"
beta = 0.1
"#;

#[test]
fn a_valid_recipe_resolves_references() {
    let recipe = load(BASE).unwrap();
    assert_eq!(recipe.name, "demo");
    let names: Vec<_> = recipe.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["prefs", "base", "sft", "dpo"]);
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    assert_eq!(dpo.seed, 7);
    let roles: Vec<_> = dpo.inputs.iter().map(|i| i.field.role.as_str()).collect();
    assert_eq!(roles, ["model", "reference", "data"]);
    assert_eq!(
        dpo.inputs[1].target,
        Target::Node {
            name: "sft".into(),
            output: None
        }
    );
    // Defaults are filled in.
    assert_eq!(dpo.spec.params()["learning_rate"], 1e-6);
    assert_eq!(dpo.spec.params()["loss_type"], "sigmoid");
}

#[test]
fn unknown_key_points_at_it_with_a_hint() {
    let text = BASE.replace("beta = 0.1", "bta = 0.1");
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("recipe.toml:21:1: stage `dpo`: unknown key `bta`"),
        "{errors:?}"
    );
    assert!(errors[0].contains("did you mean `beta`?"), "{errors:?}");
}

#[test]
fn wrong_type_and_range() {
    let errors = errors_of(&BASE.replace("beta = 0.1", "beta = \"high\"\nepochs = 0"));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("21:8: stage `dpo`: expected a number, found string \"high\""),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("22:10: stage `dpo`: must be at least 1"),
        "{errors:?}"
    );
}

#[test]
fn unknown_kind_suggests_the_nearest() {
    let errors = errors_of(&BASE.replace("kind = \"dpo\"", "kind = \"dpoo\""));
    assert!(errors[0].contains("unknown kind `dpoo`"), "{errors:?}");
    assert!(errors[0].contains("did you mean `dpo`?"), "{errors:?}");
}

#[test]
fn dangling_reference() {
    let errors = errors_of(&BASE.replace("model = \"sft\"", "model = \"sfty\""));
    assert!(
        errors[0].contains("19:9: reference to unknown node `sfty`"),
        "{errors:?}"
    );
    assert!(errors[0].contains("did you mean `sft`?"), "{errors:?}");
}

#[test]
fn duplicate_names_across_sections() {
    let errors = errors_of(&format!(
        "{BASE}\n[stages.prefs]\nkind = \"sft\"\nmodel = \"base\"\ndata = \"prefs\"\n"
    ));
    assert!(
        errors[0].contains("duplicate node name `prefs`"),
        "{errors:?}"
    );
}

#[test]
fn reference_of_the_wrong_type() {
    let errors = errors_of(&BASE.replace("model = \"sft\"", "model = \"prefs\""));
    assert!(
        errors[0].contains("`model` must be a model, but `prefs` produces datasets"),
        "{errors:?}"
    );
}

#[test]
fn syntax_error_has_a_position() {
    let errors = errors_of("[stages.x]\nkind = \n");
    assert!(errors[0].contains("recipe.toml:2:8: "), "{errors:?}");
    assert!(errors[0].contains("invalid TOML"), "{errors:?}");
}

#[test]
fn overrides_are_typed_and_located() {
    let (_dir, path) = write(BASE);
    let recipe = Recipe::load(&path, &["stages.dpo.beta=0.2".into()]).unwrap();
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    assert_eq!(dpo.spec.params()["beta"], 0.2);
    let err = Recipe::load(&path, &["stages.dpo.beta=high".into()]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--set:1:17: stage `dpo`: expected a number"),
        "{err}"
    );
}

#[test]
fn loss_type_accepts_a_list_and_checks_weights() {
    let ok = BASE.replace(
        "beta = 0.1",
        "loss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0, 0.5]",
    );
    load(&ok).unwrap();
    let errors = errors_of(&BASE.replace(
        "beta = 0.1",
        "loss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0]",
    ));
    assert!(
        errors[0].contains("loss_weights has 1 entries but loss_type has 2"),
        "{errors:?}"
    );
    let errors = errors_of(&BASE.replace("beta = 0.1", "loss_type = [\"sigmoid\", \"sigmod\"]"));
    assert!(errors[0].contains("did you mean `sigmoid`?"), "{errors:?}");
}

#[test]
fn command_stage_outputs_are_referenced_with_a_dot() {
    let text = r#"
[datasets.raw]
path = "raw.txt"

[stages.prep]
kind = "command"
inputs = ["raw"]
cmd = "cp {{ inputs.raw }} {{ out }}/train.jsonl"
outputs = { train = "train.jsonl" }

[stages.count]
kind = "command"
inputs = ["prep.train"]
cmd = "wc -l {{ inputs['prep.train'] }} > {{ out }}/n.txt"
outputs = { n = "n.txt" }

[stages.bad]
kind = "command"
inputs = ["prep.tarin"]
cmd = "true"
outputs = { n = "n.txt" }
"#;
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("`prep` has no output `tarin`"),
        "{errors:?}"
    );
    assert!(errors[0].contains("did you mean `train`?"), "{errors:?}");
}

#[test]
fn missing_kind_and_missing_required() {
    let errors = errors_of("[stages.x]\nmodel = \"m\"\n");
    assert!(
        errors[0].contains("stage `x`: missing `kind`"),
        "{errors:?}"
    );
    let errors = errors_of("[models.m]\nhf = \"m\"\n[stages.x]\nkind = \"sft\"\nmodel = \"m\"\n");
    assert!(
        errors[0].contains("missing required key `data`"),
        "{errors:?}"
    );
}

#[test]
fn fresh_models_need_their_shape() {
    let errors = errors_of("[models.m]\narch = \"llama\"\nhidden_size = 10\n");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("needs `intermediate_size`")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("needs `tokenizer`")),
        "{errors:?}"
    );
}

/// Every recipe in `recipes/` loads, and validates against the exported JSON Schema with a
/// standard validator (what an editor would check).
#[test]
fn bundled_recipes_validate_against_the_exported_schema() {
    let schema = rudder_schema::json_schema::recipe_schema();
    let validator =
        jsonschema::draft7::new(&schema).expect("the exported schema is valid draft-07");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let text = std::fs::read_to_string(&path).unwrap();
            let mut spans = rudder_schema::source::SpanMap::default();
            let value = rudder_schema::source::parse_toml(
                &text,
                0,
                &rudder_schema::ValuePath::root(),
                &mut spans,
            )
            .unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn the_exported_schema_rejects_what_loading_rejects() {
    let schema = rudder_schema::json_schema::recipe_schema();
    let validator = jsonschema::draft7::new(&schema).unwrap();
    let bad = serde_json::json!({"stages": {"d": {"kind": "dpo", "model": "m", "data": "p", "bta": 0.1}}});
    assert!(!validator.is_valid(&bad));
    let good = serde_json::json!({"stages": {"d": {"kind": "dpo", "model": "m", "data": "p", "beta": 0.1}}});
    assert!(
        validator.is_valid(&good),
        "{:?}",
        validator
            .iter_errors(&good)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    );
}

#[test]
fn fresh_models_need_an_even_head_dim() {
    let errors = errors_of(
        "[models.m]\narch = \"llama\"\nhidden_size = 36\nintermediate_size = 64\nnum_hidden_layers = 1\nnum_attention_heads = 4\ntokenizer = \"t.json\"\n",
    );
    assert!(errors[0].contains("head_dim 9 is odd"), "{errors:?}");
}

#[test]
fn report_to_takes_known_integrations_only() {
    let recipe =
        load(&BASE.replace("beta = 0.1", "beta = 0.1\nreport_to = [\"tensorboard\"]")).unwrap();
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    assert_eq!(
        dpo.spec.params()["report_to"],
        serde_json::json!(["tensorboard"])
    );
    // Unset, it is left out of the parameters, so lockfiles written before it existed agree.
    let NodeBody::Stage(sft) = &recipe.node("sft").unwrap().body else {
        panic!()
    };
    assert!(sft.spec.params().get("report_to").is_none());

    let errors = errors_of(&BASE.replace("beta = 0.1", "beta = 0.1\nreport_to = [\"wandb\"]"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("recipe.toml:22:14"), "{errors:?}");
    assert!(errors[0].contains("tensorboard"), "{errors:?}");
}

#[test]
fn executor_jobs_and_resources_load() {
    let text = BASE
        .replace("seed = 7", "seed = 7\njobs = 3")
        .replace(
            "[datasets.prefs]",
            "[executor]\nkind = \"slurm\"\npoll_seconds = 0.5\nresources = { partition = \"gpu\", extra = [\"--qos=low\"] }\n\n[datasets.prefs]",
        )
        .replace(
            "beta = 0.1",
            "beta = 0.1\n\n[stages.dpo.resources]\ngpus = 1\ncpus = 8\nmem = \"64G\"\ntime = \"4:00:00\"\naccount = \"lab\"\nextra = [\"--qos=high\"]",
        );
    let recipe = load(&text).unwrap();
    assert_eq!(recipe.meta.jobs, Some(3));
    assert_eq!(recipe.executor.kind, rudder_schema::ExecutorKind::Slurm);
    assert_eq!(recipe.executor.poll_seconds, 0.5);
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    let merged = dpo.resources.or(&recipe.executor.resources);
    assert_eq!(merged.gpus, Some(1));
    assert_eq!(merged.mem.as_deref(), Some("64G"));
    assert_eq!(merged.partition.as_deref(), Some("gpu"));
    assert_eq!(merged.extra, ["--qos=low", "--qos=high"]);
    // Resources are not parameters: the kind's parameters do not see them.
    assert!(dpo.spec.params().get("resources").is_none());
    let NodeBody::Stage(sft) = &recipe.node("sft").unwrap().body else {
        panic!()
    };
    assert_eq!(sft.resources, rudder_schema::Resources::default());
}

#[test]
fn bad_resources_are_located() {
    let text = BASE.replace(
        "beta = 0.1",
        "beta = 0.1\nresources = { mem = \"64GB\", time = \"4h\", extra = [\"--qos=x\", \"qos=high\"], gpu = 1 }",
    );
    let errors = errors_of(&text).join("\n");
    assert!(errors.contains("unknown key `gpu`"), "{errors}");
    assert!(errors.contains("did you mean `gpus`?"), "{errors}");
    let text = BASE.replace(
        "beta = 0.1",
        "beta = 0.1\nresources = { mem = \"64GB\", time = \"4h\", extra = [\"--qos=x\", \"qos=high\"] }",
    );
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].contains("recipe.toml:22:21: stage `dpo`: `mem = \"64GB\"` is not a memory size"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("22:36: stage `dpo`: `time = \"4h\"` is not a Slurm time limit"),
        "{errors:?}"
    );
    assert!(
        errors[2].contains("22:62: stage `dpo`: `qos=high` is not an sbatch option"),
        "{errors:?}"
    );
    let errors = errors_of(&BASE.replace(
        "[datasets.prefs]",
        "[executor]\nkind = \"pbs\"\n\n[datasets.prefs]",
    ));
    assert!(errors[0].contains("[executor]"), "{errors:?}");
    assert!(errors[0].contains("recipe.toml:7:8"), "{errors:?}");
}

#[test]
fn remotes_are_declared_by_name_and_are_in_no_node() {
    let recipe = load(&format!(
        "[remotes.team]\nurl = \"s3://bucket/rudder\"\ndefault = true\n\n[remotes.nfs]\nurl = \"../shared/store\"\n\n{}",
        BASE.replace("seed = 7", "seed = 7\nremote_cache = \"read\"")
    ))
    .unwrap();
    assert_eq!(recipe.remotes.len(), 2);
    assert!(recipe.remotes["team"].default);
    assert!(!recipe.remotes["nfs"].default);
    assert_eq!(recipe.meta.remote_cache, rudder_schema::RemoteCache::Read);
    assert_eq!(recipe.nodes.len(), 4);
}

#[test]
fn bad_remotes_are_located() {
    let errors = errors_of(
        "[remotes.a]\nurl = \"s3://b/p\"\ndefault = true\n\n[remotes.b]\nurl = \"/x\"\ndefault = true\n",
    );
    assert!(
        errors[0].contains("recipe.toml:7:11") && errors[0].contains("both the default"),
        "{errors:?}"
    );
    let errors = errors_of("[remotes.a]\nurl = \"http://host/x\"\n");
    assert!(
        errors[0].contains("recipe.toml:2:7") && errors[0].contains("unsupported remote scheme"),
        "{errors:?}"
    );
    let errors = errors_of("[remotes.a]\nurl = \"s3://b/p\"\naccess_key_id = \"AKIA\"\n");
    assert!(
        errors[0].contains("recipe.toml:3:1") && errors[0].contains("from the environment"),
        "{errors:?}"
    );
    let errors = errors_of("[remotes.a]\nurl = \"s3://b/p\"\ndefualt = true\n");
    assert!(errors[0].contains("did you mean `default`"), "{errors:?}");
    let errors = errors_of("[remotes.a]\nurl = \"az://c/p?sv=2024&sig=abc\"\n");
    assert!(errors[0].contains("query string"), "{errors:?}");
    let errors = errors_of("[remotes.a]\nurl = 3\n");
    assert!(errors[0].contains("recipe.toml:2:7"), "{errors:?}");
    let errors = errors_of("[recipe]\nremote_cache = \"write\"\n");
    assert!(errors[0].contains("recipe.toml:2:16"), "{errors:?}");
}

#[test]
fn the_exported_schema_knows_remotes() {
    let schema = rudder_schema::json_schema::recipe_schema();
    let validator = jsonschema::draft7::new(&schema).unwrap();
    let good = serde_json::json!({
        "recipe": {"remote_cache": "read-write"},
        "remotes": {"team": {"url": "s3://b/p", "default": true}}
    });
    assert!(validator.is_valid(&good));
    let secret = serde_json::json!({"remotes": {"team": {"url": "s3://b/p", "secret": "x"}}});
    assert!(!validator.is_valid(&secret));
    let mode = serde_json::json!({"recipe": {"remote_cache": "write"}});
    assert!(!validator.is_valid(&mode));
}

#[test]
fn lora_table_takes_peft_defaults_and_all_linear() {
    let text = BASE.replace(
        "data = \"prefs\"\n\n[stages.dpo]",
        "data = \"prefs\"\nlora = { r = 16, alpha = 32, target_modules = \"all-linear\" }\n\n[stages.dpo]",
    );
    let recipe = load(&text).unwrap();
    let NodeBody::Stage(sft) = &recipe.node("sft").unwrap().body else {
        panic!()
    };
    let lora = &sft.spec.params()["lora"];
    assert_eq!(lora["r"], 16);
    assert_eq!(lora["alpha"], 32.0);
    assert_eq!(lora["dropout"], 0.0);
    assert_eq!(lora["use_rslora"], false);
    assert_eq!(lora["target_modules"], "all-linear");
    // Over a LoRA stage, a stage without a table continues that adapter: it takes the table.
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    assert_eq!(dpo.spec.params()["lora"], *lora);
    // Without a table, and nothing to continue, the parameters (and so the keys) are what they
    // were.
    let recipe = load(BASE).unwrap();
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    assert!(dpo.spec.params().get("lora").is_none());

    let defaults = BASE.replace("beta = 0.1", "beta = 0.1\nlora = {}");
    let recipe = load(&defaults).unwrap();
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    let lora = &dpo.spec.params()["lora"];
    assert_eq!(lora["r"], 8);
    assert_eq!(lora["alpha"], 8.0);
    assert_eq!(
        lora["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
}

#[test]
fn lora_errors_point_into_the_table() {
    let errors = errors_of(&BASE.replace(
        "beta = 0.1",
        "beta = 0.1\nlora = { r = 0, alpah = 16, target_modules = [\"q_proj\", \"qkv\"] }",
    ));
    let all = errors.join("\n");

    assert!(all.contains("recipe.toml:22:"), "{all}");
    assert!(
        all.contains("unknown key `alpah`") && all.contains("did you mean `alpha`?"),
        "{all}"
    );
    assert!(
        all.contains("22:14: stage `dpo`: must be at least 1"),
        "{all}"
    );
    assert!(all.contains("found `qkv`"), "{all}");

    let errors = errors_of(&BASE.replace(
        "beta = 0.1",
        "beta = 0.1\nlora = { modules_to_save = [\"score\"] }",
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("recipe.toml:22:") && errors[0].contains("has no `score` module"),
        "{errors:?}"
    );

    let errors =
        errors_of(&BASE.replace("beta = 0.1", "beta = 0.1\nsync_ref_model = true\nlora = {}"));
    assert!(
        errors[0].contains("cannot be combined with `lora`"),
        "{errors:?}"
    );
}

#[test]
fn pad_to_multiple_of_defaults_by_backend_and_rejects_zero() {
    use rudder_schema::Backend;
    let recipe = load(BASE).unwrap();
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    // Unset, it is left out of the parameters (so keys are what they were) and the backend
    // decides: exact lengths on `cpu`, buckets of 64 on the GPU backends.
    assert!(dpo.spec.params().get("pad_to_multiple_of").is_none());
    let train = dpo.spec.train_args().unwrap();
    assert_eq!(train.pad_to_multiple_of, None);
    assert_eq!(train.pad_multiple(Backend::Cpu), 1);
    assert_eq!(train.pad_multiple(Backend::Wgpu), 64);
    assert_eq!(train.pad_multiple(Backend::Cuda), 64);

    let recipe = load(&BASE.replace("beta = 0.1", "beta = 0.1\npad_to_multiple_of = 8")).unwrap();
    let NodeBody::Stage(dpo) = &recipe.node("dpo").unwrap().body else {
        panic!()
    };
    assert_eq!(dpo.spec.params()["pad_to_multiple_of"], 8);
    let train = dpo.spec.train_args().unwrap();
    assert_eq!(train.pad_multiple(Backend::Cpu), 8);
    assert_eq!(train.pad_multiple(Backend::Cuda), 8);

    let errors = errors_of(&BASE.replace("beta = 0.1", "beta = 0.1\npad_to_multiple_of = 0"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("recipe.toml:22:22: stage `dpo`: must be at least 1"),
        "{errors:?}"
    );
}

fn lora_of(recipe: &Recipe, node: &str) -> Option<serde_json::Value> {
    let NodeBody::Stage(stage) = &recipe.node(node).unwrap().body else {
        panic!("{node} is a stage")
    };
    stage.spec.params().get("lora").cloned()
}

#[test]
fn a_stage_without_lora_continues_the_adapter_it_reads() {
    let text = format!(
        "{}{}",
        BASE.replace(
            "data = \"prefs\"\n\n[stages.dpo]",
            "data = \"prefs\"\nlora = { r = 4, alpha = 8, dropout = 0.1 }\n\n[stages.dpo]",
        ),
        r#"
[stages.kto]
kind = "kto"
model = "dpo"
data = "prefs"

[stages.rm]
kind = "reward"
model = "sft"
data = "prefs"

[stages.full]
kind = "orpo"
model = "sft"
data = "prefs"
merge_adapter = true

[stages.from_rm]
kind = "sft"
model = "rm"
data = "prefs"

[stages.fresh]
kind = "sft"
model = "base"
data = "prefs"
"#
    );
    let recipe = load(&text).unwrap();
    let sft = lora_of(&recipe, "sft").expect("written");
    assert_eq!(sft["r"], 4);
    assert_eq!(sft["dropout"], 0.1);
    // dpo over sft, kto over dpo (a chain), a reward model over the language model's adapter.
    for node in ["dpo", "kto", "rm"] {
        assert_eq!(lora_of(&recipe, node).as_ref(), Some(&sft), "{node}");
    }
    // `merge_adapter = true` without `lora`: the merged model, trained in full. A language
    // model over a reward model's adapter merges it (as with `lora`), and a stage over a plain
    // model has nothing to continue.
    for node in ["full", "from_rm", "fresh"] {
        assert_eq!(lora_of(&recipe, node), None, "{node}");
    }
}

#[test]
fn an_inherited_lora_table_is_checked_as_a_written_one() {
    // TR-DPO over a LoRA stage: as with a written table, `sync_ref_model` and `lora` conflict.
    let text = BASE
        .replace(
            "data = \"prefs\"\n\n[stages.dpo]",
            "data = \"prefs\"\nlora = { r = 4, alpha = 8 }\n\n[stages.dpo]",
        )
        .replace("beta = 0.1", "beta = 0.1\nsync_ref_model = true");
    let errors = errors_of(&text).join("\n");
    assert!(
        errors.contains("stage `dpo` continues the LoRA adapter of `sft` with its settings"),
        "{errors}"
    );
    assert!(
        errors.contains("cannot be combined with `lora`"),
        "{errors}"
    );
    assert!(errors.contains("merge_adapter = true"), "{errors}");
    assert_eq!(
        errors.matches("continues the LoRA adapter").count(),
        1,
        "{errors}"
    );
    // The stage's own errors are reported once, not again with the inherited table.
    let own = text.replace(
        "sync_ref_model = true",
        "sync_ref_model = true\nmax_length = 8\nmax_prompt_length = 8",
    );
    let own_errors = errors_of(&own).join("\n");
    assert_eq!(
        own_errors
            .matches("max_prompt_length must be smaller")
            .count(),
        1,
        "{own_errors}"
    );
    assert_eq!(
        own_errors.matches("continues the LoRA adapter").count(),
        1,
        "{own_errors}"
    );
    // With `merge_adapter = true` it trains the merged model in full.
    let merged = text.replace(
        "sync_ref_model = true",
        "sync_ref_model = true\nmerge_adapter = true",
    );
    let recipe = load(&merged).unwrap();
    assert_eq!(lora_of(&recipe, "dpo"), None);

    // A reward model over a language model whose adapter trains `lm_head`.
    let text = format!(
        "{}\n[stages.rm]\nkind = \"reward\"\nmodel = \"sft\"\ndata = \"prefs\"\n",
        BASE.replace(
            "data = \"prefs\"\n\n[stages.dpo]",
            "data = \"prefs\"\nlora = { r = 4, alpha = 8, modules_to_save = [\"lm_head\"] }\n\n[stages.dpo]",
        )
    );
    let errors = errors_of(&text).join("\n");
    assert!(errors.contains("stage `rm` continues"), "{errors}");
    assert!(errors.contains("has no `lm_head` module"), "{errors}");
}

#[test]
fn precision_reaches_only_the_kinds_that_compute_in_one() {
    let text = format!(
        "{}\n[stages.out]\nkind = \"export\"\nmodel = \"dpo\"\nout = \"exported\"\n",
        BASE.replace("seed = 7", "seed = 7\nprecision = \"bf16\"")
    );
    let recipe = load(&text).unwrap();
    let precision = |node: &str| match &recipe.node(node).unwrap().body {
        NodeBody::Stage(stage) => stage.precision.as_str(),
        _ => panic!("{node} is a stage"),
    };
    assert_eq!(precision("dpo"), "bf16");
    assert_eq!(precision("out"), "fp32");
    let errors = errors_of(&text.replace(
        "out = \"exported\"",
        "out = \"exported\"\nprecision = \"bf16\"",
    ));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`export` stages compute in no precision")),
        "{errors:?}"
    );
}
