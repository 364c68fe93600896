//! Mutated recipes (truncated, corrupted, wrongly typed, deeply nested) never panic: loading
//! and graph building return an error or a recipe, nothing else.

use std::path::Path;

use rudder_engine::Project;

const RECIPE: &str = r#"
[recipe]
name = "m"
seed = 3

[datasets.prefs]
path = "prefs.jsonl"
columns = { prompt = "question" }

[models.base]
hf = "base"

[models.fresh]
arch = "llama"
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 4
tokenizer = "tok"

[stages.tok]
kind = "tokenizer"
data = "prefs"
vocab_size = 512

[stages.sft]
kind = "sft"
model = "base"
data = "prefs"

[stages.dpo]
kind = "dpo"
model = "sft"
data = "prefs"
loss_type = ["sigmoid", "sft"]
loss_weights = [1.0, 0.5]

[stages.idpo]
kind = "iterative_dpo"
model = "sft"
data = "prefs"
judge = { rule = "regex", pattern = "[0-9]+" }
rounds = 3
round = { "2" = { beta = 0.2 } }

[stages.prep]
kind = "command"
inputs = ["prefs", "dpo"]
cmd = "echo {{ inputs.prefs }} > {{ out }}/x"
outputs = { x = "x" }
after = ["idpo"]
"#;

fn load(dir: &Path, text: &str) {
    let file = dir.join("recipe.toml");
    std::fs::write(&file, text).unwrap();
    let _ = Project::open(&file, &[], None);
}

/// A small deterministic generator, so failures reproduce.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn the_base_recipe_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recipe.toml");
    std::fs::write(&file, RECIPE).unwrap();
    let project = Project::open(&file, &[], None).unwrap();
    let names: Vec<&str> = project
        .graph
        .order
        .iter()
        .map(|&i| project.graph.vertex(i).name.as_str())
        .collect();
    assert!(names.contains(&"dpo/ref_logps"), "{names:?}");
    assert!(names.contains(&"idpo/round-2"), "{names:?}");
}

#[test]
fn truncations_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut cut = 0;
    while cut < RECIPE.len() {
        if RECIPE.is_char_boundary(cut) {
            load(dir.path(), &RECIPE[..cut]);
        }
        cut += 1;
    }
}

#[test]
fn random_corruptions_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Lcg(7);
    let alphabet = b"[]{}=\".,'#\n 0123456789abcxyz_-\\\t\x00\xff";
    for _ in 0..600 {
        let mut bytes = RECIPE.as_bytes().to_vec();
        for _ in 0..1 + rng.next() % 6 {
            let at = (rng.next() as usize) % bytes.len();
            match rng.next() % 3 {
                0 => bytes[at] = alphabet[(rng.next() as usize) % alphabet.len()],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, alphabet[(rng.next() as usize) % alphabet.len()]),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        load(dir.path(), &text);
    }
}

#[test]
fn wrong_types_and_deep_nesting_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let values = [
        "1",
        "-1",
        "1.5",
        "nan",
        "inf",
        "true",
        "\"x\"",
        "[]",
        "[1, \"a\"]",
        "{}",
        "{ a = 1 }",
        "1979-05-27T07:32:00Z",
        "18446744073709551615",
    ];
    for key in [
        "seed",
        "beta",
        "epochs",
        "loss_type",
        "model",
        "data",
        "kind",
        "after",
        "rounds",
        "round",
        "judge",
        "inputs",
        "outputs",
        "columns",
        "hf",
    ] {
        for value in values {
            let text = RECIPE.to_owned()
                + &format!(
                    "\n[stages.extra]\nkind = \"dpo\"\nmodel = \"sft\"\ndata = \"prefs\"\n{key} = {value}\n"
                );
            load(dir.path(), &text);
            let text = RECIPE.replacen("seed = 3", &format!("seed = {value}"), 1);
            load(dir.path(), &text);
        }
    }
    for depth in [10, 100, 1000, 10000] {
        let nested = format!(
            "[stages.x]\nkind = \"sft\"\nmodel = {}1{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        load(dir.path(), &nested);
        let inline = format!(
            "[stages.x]\nkind = \"sft\"\nmodel = {}1{}\n",
            "{a=".repeat(depth),
            "}".repeat(depth)
        );
        load(dir.path(), &inline);
    }
}
