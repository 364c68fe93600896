//! The fuzz targets: every parser of user files beyond recipes, driven by mutated seeds and
//! generated values (see `src/lib.rs`). Each target prints how many inputs it ran and the most
//! memory one of them took. Every allocation is counted: one that would take the process past
//! 1 GiB is refused, which aborts the run with a message naming the case directory that holds
//! the input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use rudder_fuzz::{
    JsonEdit, Mutation, cases, edit_json, join_safetensors, json_edits, mutate, mutations, run,
    seeds, split_safetensors, write_case,
};
use rudder_stages::data::{Format, read_rows};
use rudder_stages::model::hf::{load_causal_lm, load_config, load_reward_model};
use rudder_stages::tokenizer::{Message, Tokenizer, render_chat_template};
use serde_json::Value;

const REFUSE_ABOVE: usize = 1 << 30;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn refuse() {
    const MESSAGE: &[u8] = b"fuzz: an input made the parser allocate past 1 GiB; it is in the case directory printed when its target started\n";
    // SAFETY: writing a static buffer to stderr; no allocation may happen here.
    unsafe {
        libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
    }
}

fn grow(size: usize) -> bool {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    if size > REFUSE_ABOVE || live > REFUSE_ABOVE {
        LIVE.fetch_sub(size, Ordering::Relaxed);
        refuse();
        return false;
    }
    PEAK.fetch_max(live, Ordering::Relaxed);
    true
}

// SAFETY: every call is forwarded to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !grow(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !grow(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !grow(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        let out = unsafe { System.realloc(ptr, layout, new_size) };
        if out.is_null() {
            if new_size > layout.size() {
                LIVE.fetch_sub(new_size - layout.size(), Ordering::Relaxed);
            }
        } else if new_size < layout.size() {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        out
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Targets run one at a time, so that the peak of a case is its own.
static SERIAL: Mutex<()> = Mutex::new(());

/// Measures the memory one case takes beyond what was live before it.
struct Meter {
    worst: AtomicUsize,
}

impl Meter {
    fn new() -> Self {
        Meter {
            worst: AtomicUsize::new(0),
        }
    }

    /// Runs `f`; fails when it took more than `64 x input + 64 MiB`.
    fn measure<T>(&self, input_bytes: usize, f: impl FnOnce() -> T) -> Result<T, String> {
        self.measure_within(64 * input_bytes + (64 << 20), input_bytes, f)
    }

    fn measure_within<T>(
        &self,
        bound: usize,
        input_bytes: usize,
        f: impl FnOnce() -> T,
    ) -> Result<T, String> {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let out = f();
        let used = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        self.worst.fetch_max(used, Ordering::Relaxed);
        if used > bound {
            return Err(format!(
                "took {used} bytes for {input_bytes} bytes of input"
            ));
        }
        Ok(out)
    }

    fn report(&self, target: &str, ran: u32) {
        self.report_as(target, ran, "no panic, every error named its file");
    }

    fn report_as(&self, target: &str, ran: u32, held: &str) {
        eprintln!(
            "fuzz {target}: {ran} inputs, {held}, at most {:.1} MiB per input",
            self.worst.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
        );
    }
}

fn case_dir(target: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("rudder-fuzz-{target}-"))
        .tempdir()
        .expect("a temporary directory");
    eprintln!("fuzz {target}: cases in {}", dir.path().display());
    dir
}

/// An error must say which file it is about.
fn names(err: &impl std::fmt::Display, path: &Path) -> Result<(), String> {
    let text = err.to_string();
    let dir = path.display().to_string();
    if text.contains(&dir) {
        Ok(())
    } else {
        Err(format!("the error does not name {dir}: {text}"))
    }
}

fn format_of(name: &str) -> Format {
    match name.rsplit('.').next() {
        Some("jsonl") => Format::Jsonl,
        Some("json") => Format::Json,
        Some("parquet") => Format::Parquet,
        _ => Format::Txt,
    }
}

const FORMATS: [Format; 4] = [Format::Jsonl, Format::Json, Format::Parquet, Format::Txt];

/// Reads a data file and builds every kind of example from it.
fn check_rows(
    file: &Path,
    format: Format,
    columns: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    let rows = match read_rows(file, format, columns) {
        Ok(rows) => rows,
        Err(e) => return names(&e, file),
    };
    for result in [
        rows.sft_examples("text").map(|_| ()),
        rows.preference_pairs().map(|_| ()),
        rows.unpaired_examples().map(|_| ()),
        rows.prompts().map(|_| ()),
    ] {
        if let Err(e) = result {
            names(&e, file)?;
        }
    }
    Ok(())
}

fn columns() -> impl Strategy<Value = std::collections::BTreeMap<String, String>> {
    let name = prop_oneof![
        Just("prompt"),
        Just("completion"),
        Just("chosen"),
        Just("text"),
        Just("messages"),
        Just("question"),
    ];
    prop::collection::btree_map(
        name.clone().prop_map(String::from),
        name.prop_map(String::from),
        0..2,
    )
}

#[test]
fn data_files() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seeds = seeds("data");
    let dir = case_dir("data");
    let meter = Meter::new();
    let strategy = (
        0..seeds.len(),
        mutations(),
        prop::option::weighted(0.2, 0..FORMATS.len()),
        columns(),
    );
    let ran = run(
        "data",
        cases(1500),
        strategy,
        |(seed, edits, format, columns)| {
            let (name, bytes) = &seeds[seed];
            let bytes = mutate(bytes, &edits);
            let format = format.map_or_else(|| format_of(name), |f| FORMATS[f]);
            write_case(dir.path(), &[(name, &bytes)]);
            let file = dir.path().join(name);
            meter.measure(bytes.len(), || check_rows(&file, format, &columns))?
        },
    );
    meter.report("data files", ran);
}

/// Rows with every standard field present or absent and of any JSON type, nested.
fn awkward_row() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    let field = prop_oneof![
        Just("prompt"),
        Just("completion"),
        Just("chosen"),
        Just("rejected"),
        Just("messages"),
        Just("conversations"),
        Just("text"),
        Just("instruction"),
        Just("input"),
        Just("output"),
        Just("label"),
        Just("margin"),
    ]
    .prop_map(String::from);
    let message = prop::collection::btree_map(
        prop_oneof![Just("role"), Just("content"), Just("from"), Just("value")]
            .prop_map(String::from),
        prop_oneof![
            Just(Value::from("user")),
            Just(Value::from("assistant")),
            Just(Value::from("system")),
            Just(Value::from("gpt")),
            Just(Value::from("human")),
            rudder_fuzz::awkward_value(),
        ],
        0..3,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()));
    let value = prop_oneof![
        3 => rudder_fuzz::awkward_value(),
        2 => ".{0,20}".prop_map(Value::String),
        2 => prop::collection::vec(message, 0..4).prop_map(Value::Array),
    ];
    prop::collection::btree_map(field, value, 0..6).prop_map(|m| m.into_iter().collect())
}

#[test]
fn data_rows_of_every_type() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = case_dir("rows");
    let meter = Meter::new();
    let strategy = (
        prop::collection::vec(awkward_row(), 1..6),
        any::<bool>(),
        columns(),
    );
    let ran = run("rows", cases(800), strategy, |(rows, as_array, columns)| {
        let (name, text) = if as_array {
            let array = Value::Array(rows.into_iter().map(Value::Object).collect());
            ("rows.json", array.to_string())
        } else {
            let lines: Vec<String> = rows
                .into_iter()
                .map(|r| Value::Object(r).to_string())
                .collect();
            ("rows.jsonl", lines.join("\n"))
        };
        write_case(dir.path(), &[(name, text.as_bytes())]);
        let file = dir.path().join(name);
        meter.measure(text.len(), || check_rows(&file, format_of(name), &columns))?
    });
    meter.report("generated rows", ran);
}

/// How a case damages a model directory.
#[derive(Debug, Clone)]
enum ModelDamage {
    /// config.json values replaced, removed or added.
    Config(Vec<JsonEdit>),
    ConfigBytes(Vec<Mutation>),
    /// The safetensors header (shapes, dtypes, offsets) edited, written back with its length.
    Header(Vec<JsonEdit>),
    /// The safetensors bytes edited (the length prefix, the data, truncation).
    WeightBytes(Vec<Mutation>),
    /// The length prefix set to this value.
    HeaderLength(u64),
}

fn model_damage() -> impl Strategy<Value = Vec<ModelDamage>> {
    let one = prop_oneof![
        3 => json_edits().prop_map(ModelDamage::Config),
        1 => mutations().prop_map(ModelDamage::ConfigBytes),
        3 => json_edits().prop_map(ModelDamage::Header),
        2 => mutations().prop_map(ModelDamage::WeightBytes),
        1 => prop_oneof![Just(0u64), Just(7), Just(u64::MAX), Just(1 << 40), any::<u64>()]
            .prop_map(ModelDamage::HeaderLength),
    ];
    prop::collection::vec(one, 1..3)
}

#[test]
fn model_directories() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = seeds("model");
    let config_seed: Value = serde_json::from_slice(
        &model
            .iter()
            .find(|(n, _)| n == "config.json")
            .expect("seed config")
            .1,
    )
    .expect("the seed config is JSON");
    let weights_seed = model
        .iter()
        .find(|(n, _)| n == "model.safetensors")
        .expect("seed weights")
        .1
        .clone();
    let dir = case_dir("model");
    let meter = Meter::new();
    let device = rudder_stages::test_device();
    let ran = run("model", cases(300), model_damage(), |damage| {
        let mut config = serde_json::to_vec(&config_seed).expect("serialises");
        let mut weights = weights_seed.clone();
        for d in &damage {
            match d {
                ModelDamage::Config(edits) => {
                    let value = serde_json::from_slice(&config).unwrap_or(Value::Null);
                    config = serde_json::to_vec(&edit_json(&value, edits)).expect("serialises");
                }
                ModelDamage::ConfigBytes(edits) => config = mutate(&config, edits),
                ModelDamage::Header(edits) => {
                    if let Some((header, data)) = split_safetensors(&weights) {
                        weights = join_safetensors(&edit_json(&header, edits), &data);
                    }
                }
                ModelDamage::WeightBytes(edits) => weights = mutate(&weights, edits),
                ModelDamage::HeaderLength(n) if weights.len() >= 8 => {
                    weights[..8].copy_from_slice(&n.to_le_bytes());
                }
                ModelDamage::HeaderLength(_) => {}
            }
        }
        write_case(
            dir.path(),
            &[("config.json", &config), ("model.safetensors", &weights)],
        );
        let path = dir.path();
        meter.measure(config.len() + weights.len(), || {
            if let Err(e) = load_config(path) {
                names(&e, path)?;
            }
            if let Err(e) = load_causal_lm(path, &device) {
                names(&e, path)?;
            }
            if let Err(e) = load_reward_model(path, &device) {
                names(&e, path)?;
            }
            Ok(())
        })?
    });
    meter.report("model directories", ran);
}

#[derive(Debug, Clone)]
enum TokenizerDamage {
    Json(Vec<JsonEdit>),
    Bytes(Vec<Mutation>),
    Config(Vec<JsonEdit>),
    /// A chat_template.jinja beside tokenizer.json (read when the config has none).
    Template(usize, Vec<Mutation>),
}

fn messages() -> impl Strategy<Value = Vec<Message>> {
    let role = prop_oneof![
        Just("system"),
        Just("user"),
        Just("assistant"),
        Just("tool"),
        Just(""),
    ];
    prop::collection::vec(
        (role, ".{0,24}").prop_map(|(role, content)| Message {
            role: role.into(),
            content,
        }),
        0..5,
    )
}

#[test]
fn tokenizers_and_their_configs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kinds = ["bpe", "wordlevel"];
    let seed_dirs: Vec<Vec<(String, Vec<u8>)>> = kinds
        .iter()
        .map(|k| seeds(&format!("tokenizer/{k}")))
        .collect();
    let templates = seeds("templates");
    let dir = case_dir("tokenizer");
    let meter = Meter::new();
    let damage = prop_oneof![
        3 => json_edits().prop_map(TokenizerDamage::Json),
        2 => mutations().prop_map(TokenizerDamage::Bytes),
        3 => json_edits().prop_map(TokenizerDamage::Config),
        1 => (0..templates.len(), mutations()).prop_map(|(t, m)| TokenizerDamage::Template(t, m)),
    ];
    let strategy = (
        0..kinds.len(),
        prop::collection::vec(damage, 1..3),
        messages(),
        ".{0,40}",
    );
    let ran = run(
        "tokenizer",
        cases(400),
        strategy,
        |(kind, damage, msgs, text)| {
            let files = &seed_dirs[kind];
            let get = |name: &str| {
                files
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, b)| b.clone())
                    .expect("seed file")
            };
            let mut tokenizer = get("tokenizer.json");
            let mut config = get("tokenizer_config.json");
            let mut template: Option<Vec<u8>> = None;
            for d in &damage {
                match d {
                    TokenizerDamage::Json(edits) => {
                        if let Ok(value) = serde_json::from_slice::<Value>(&tokenizer) {
                            tokenizer =
                                serde_json::to_vec(&edit_json(&value, edits)).expect("json");
                        }
                    }
                    TokenizerDamage::Bytes(edits) => tokenizer = mutate(&tokenizer, edits),
                    TokenizerDamage::Config(edits) => {
                        if let Ok(value) = serde_json::from_slice::<Value>(&config) {
                            config = serde_json::to_vec(&edit_json(&value, edits)).expect("json");
                        }
                    }
                    TokenizerDamage::Template(t, edits) => {
                        template = Some(mutate(&templates[*t].1, edits));
                        // Only read when the config has no template of its own.
                        if let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&config)
                        {
                            map.shift_remove("chat_template");
                            config = serde_json::to_vec(&map).expect("json");
                        }
                    }
                }
            }
            let mut files: Vec<(&str, &[u8])> = vec![
                ("tokenizer.json", &tokenizer),
                ("tokenizer_config.json", &config),
            ];
            if let Some(t) = &template {
                files.push(("chat_template.jinja", t));
            }
            write_case(dir.path(), &files);
            let path = dir.path();
            let size = tokenizer.len() + config.len() + template.as_ref().map_or(0, Vec::len);
            meter.measure_within(TEMPLATE_MEMORY + 64 * size, size, || {
                let tok = match Tokenizer::from_dir(path) {
                    Ok(tok) => tok,
                    Err(e) => return names(&e, path),
                };
                match tok.encode(&text, true) {
                    Ok(ids) => {
                        if let Err(e) = tok.decode(&ids, false) {
                            names(&e, path)?;
                        }
                    }
                    Err(e) => names(&e, path)?,
                }
                if let Err(e) = tok.encode_completion(&text) {
                    names(&e, path)?;
                }
                if tok.chat_template.is_some()
                    && let Err(e) = tok.apply_chat_template(&msgs, true)
                {
                    names(&e, path)?;
                }
                Ok(())
            })?
        },
    );
    meter.report("tokenizers", ran);
}

/// What one render may take: minijinja's largest single value plus what fuel allows.
const TEMPLATE_MEMORY: usize = (100 << 20) + (192 << 20);

#[test]
fn chat_templates() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let templates = seeds("templates");
    let meter = Meter::new();
    let strategy = (0..templates.len(), mutations(), messages(), any::<bool>());
    let ran = run(
        "templates",
        cases(1500),
        strategy,
        |(t, edits, msgs, generation)| {
            let bytes = mutate(&templates[t].1, &edits);
            let template = String::from_utf8_lossy(&bytes);
            // Rendering returns, in time and memory, whatever the template; errors are the
            // template's message (the tokenizer target checks they name the file). minijinja
            // lets one value grow to 100 MB (`'x' * 99999999`) before fuel stops the next.
            meter.measure_within(TEMPLATE_MEMORY, bytes.len(), || {
                let _ = render_chat_template(&template, &msgs, generation, "<s>", "</s>");
            })
        },
    );
    meter.report_as("chat templates", ran, "no panic, every render returned");
}

/// The seed templates that never end or never stop growing are stopped with an error.
#[test]
fn runaway_templates_are_stopped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let templates = seeds("templates");
    let msgs = [Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    for name in ["endless.jinja", "recursive.jinja", "huge_output.jinja"] {
        let (_, bytes) = templates.iter().find(|(n, _)| n == name).expect("seed");
        let template = String::from_utf8_lossy(bytes);
        let err = render_chat_template(&template, &msgs, false, "", "")
            .expect_err(name)
            .to_string();
        eprintln!("{name}: {err}");
    }
}

/// Regenerates `corpus/model/` (a Llama of 8 hidden units): `cargo test -p rudder-fuzz --test
/// parsers -- --ignored write_model_seed`.
#[test]
#[ignore = "writes the seed corpus"]
fn write_model_seed() {
    use rudder_stages::model::config::ModelConfig;
    use rudder_stages::model::hf::{random_causal_lm, save_causal_lm};
    let cfg = ModelConfig::llama(16, 8, 16, 1, 2, 1);
    let device = rudder_stages::test_device();
    let model = random_causal_lm(&cfg, 7, &device);
    let dir = rudder_fuzz::corpus_dir().join("model");
    save_causal_lm(&model, &cfg, &dir).unwrap();
}

/// Configurations whose sizes are absurd for the weights beside them (or overflow when
/// multiplied) are errors naming the directory, found without allocating for them.
#[test]
fn absurd_model_sizes_are_errors() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = seeds("model");
    let config: Value =
        serde_json::from_slice(&model.iter().find(|(n, _)| n == "config.json").unwrap().1).unwrap();
    let weights = &model
        .iter()
        .find(|(n, _)| n == "model.safetensors")
        .unwrap()
        .1;
    let dir = case_dir("sizes");
    let meter = Meter::new();
    let huge = [1u64 << 31, 1 << 40, 1 << 62, u64::MAX];
    let fields = [
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "sliding_window",
    ];
    let device = rudder_stages::test_device();
    let mut ran = 0;
    for field in fields {
        for value in huge {
            let mut c = config.clone();
            c[field] = value.into();
            if field == "head_dim" || field == "num_attention_heads" {
                // Keep heads x head_dim consistent with the hidden size, as an attacker would.
                c["num_key_value_heads"] = c["num_attention_heads"].clone();
            }
            let text = serde_json::to_vec(&c).unwrap();
            write_case(
                dir.path(),
                &[("config.json", &text), ("model.safetensors", weights)],
            );
            let path = dir.path();
            meter
                .measure(text.len() + weights.len(), || {
                    match load_causal_lm(path, &device) {
                        // Limits on positions shape no weight: the model loads.
                        Ok(_) if matches!(field, "max_position_embeddings" | "sliding_window") => {
                            Ok(())
                        }
                        Ok(_) => Err(format!("{field} = {value} loaded")),
                        Err(e) => names(&e, path),
                    }
                })
                .and_then(|r| r)
                .unwrap_or_else(|e| panic!("{field} = {value}: {e}"));
            ran += 1;
        }
    }
    meter.report("absurd model sizes", ran);
}
