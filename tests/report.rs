//! Seeing a run through the binary: `rudder report` of a small pipeline (an SFT stage, two DPO
//! stages overlaid on one chart per metric, an evaluation) is one self-contained HTML page with
//! a line per series and axis labels, the parameters that differ from their kind's defaults
//! highlighted, the evaluation table and samples; headless Chromium renders it with no console
//! error and no request (skipped with a message when Chromium is absent, unless
//! `RUDDER_REQUIRE_CHROMIUM` is set, as CI does). `--compare` names what changed against a
//! lockfile or another recipe. `report_to = ["tensorboard"]` writes event files that match
//! metrics.jsonl and leaves keys alone (TensorBoard's own reader checks them when
//! `RUDDER_TENSORBOARD_PYTHON` names a Python that has it). `rudder status` sees a run going on
//! in another process, tells a killed one, and lists what the last run did.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Scratch;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Scores a completion by how many `a`s it holds.
const COUNT_A: &str = r#"import json, sys
for line in sys.stdin:
    print(json.loads(line)["completion"].count("a"))
"#;

const RECIPE: &str = r#"
[recipe]
seed = 1

[models.policy]
hf = "policy"

[models.reference]
hf = "reference"

[datasets.prefs]
path = "prefs.jsonl"

[datasets.instructions]
path = "sft.jsonl"

[datasets.prompts]
path = "prompts.jsonl"

[stages.sft]
kind = "sft"
model = "policy"
data = "instructions"
learning_rate = 1e-3
batch_size = 8
epochs = 1
logging_steps = 1

[stages.sigmoid]
kind = "dpo"
model = "sft"
reference = "reference"
data = "prefs"
learning_rate = 1e-3
batch_size = 4
epochs = 2
logging_steps = 1
report_to = ["tensorboard"]

[stages.ipo]
kind = "dpo"
model = "sft"
reference = "reference"
data = "prefs"
loss_type = "ipo"
learning_rate = 1e-3
batch_size = 4
epochs = 2
logging_steps = 1
report_to = ["tensorboard"]

[stages.eval]
kind = "evaluate"
models = ["sigmoid", "ipo"]
data = "prompts"
baseline = "sigmoid"
reference = "sft"
num_samples = 2
batch_size = 4
max_new_tokens = 6
temperature = 1.0
judge = { command = "python3 count_a.py", deps = ["count_a.py"] }
"#;

fn scratch(recipe: &str) -> Scratch {
    let s = Scratch::new();
    for model in ["policy", "reference"] {
        std::fs::create_dir_all(s.path(model)).unwrap();
        for file in [
            format!("{model}/config.json"),
            format!("{model}/model.safetensors"),
            "tokenizer/tokenizer.json".into(),
            "tokenizer/tokenizer_config.json".into(),
        ] {
            let name = Path::new(&file).file_name().unwrap().to_str().unwrap();
            std::fs::copy(fixtures().join(&file), s.path(&format!("{model}/{name}"))).unwrap();
        }
    }
    for data in ["prefs.jsonl", "sft.jsonl"] {
        std::fs::copy(fixtures().join(data), s.path(data)).unwrap();
    }
    s.write(
        "prompts.jsonl",
        concat!(
            "{\"prompt\": \"Question: What color is grass?\\nAnswer:\"}\n",
            "{\"prompt\": \"Complete the sentence: The dog ran to the\"}\n",
        ),
    );
    s.write("count_a.py", COUNT_A);
    s.write("recipe.toml", recipe);
    s
}

/// Text as written in the page (the template escapes `/`, quotes and angle brackets).
fn unescape(html: &str) -> String {
    html.replace("&#x2f;", "/")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The HTML of one element that starts at `at` (up to its closing tag).
fn element<'a>(html: &'a str, at: usize, tag: &str) -> &'a str {
    let end = html[at..]
        .find(&format!("</{tag}>"))
        .expect("closed element");
    &html[at..at + end]
}

/// A chart of the page.
struct Figure {
    metric: String,
    /// `(node, colour)` as its legend names them.
    series: Vec<(String, String)>,
    svg: String,
}

/// Every chart figure of the page.
fn figures(html: &str) -> Vec<Figure> {
    html.match_indices("<figure class=\"chart\"")
        .map(|(at, _)| {
            let figure = element(html, at, "figure");
            let attr = |name: &str, within: &str| {
                let start = within.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                unescape(&within[start..start + within[start..].find('"').unwrap()])
            };
            let series = figure
                .match_indices("<li data-color=")
                .map(|(i, _)| {
                    let li = element(figure, i, "li");
                    let name = unescape(li.rsplit('>').next().unwrap().trim());
                    (name, attr("data-color", li))
                })
                .collect();
            let svg_at = figure.find("<svg").expect("an svg per chart");
            let svg = element(figure, svg_at, "svg").to_owned();
            Figure {
                metric: attr("data-metric", figure),
                series,
                svg,
            }
        })
        .collect()
}

/// Stroke colours of the SVG's polylines.
fn polyline_strokes(svg: &str) -> Vec<String> {
    svg.match_indices("<polyline")
        .map(|(at, _)| {
            let tag = &svg[at..at + svg[at..].find("/>").unwrap()];
            let start = tag.find("stroke=\"").map(|i| i + 8).unwrap_or(0);
            tag[start..start + tag[start..].find('"').unwrap_or(0)].to_lowercase()
        })
        .collect()
}

/// The texts of an SVG's <text> elements.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.match_indices("<text")
        .map(|(at, _)| {
            let text = element(svg, at, "text");
            unescape(text[text.find('>').unwrap() + 1..].trim())
        })
        .collect()
}

fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(path.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
}

#[test]
fn the_report_shows_the_pipeline_curves_parameters_and_evaluation() {
    let s = scratch(RECIPE);
    s.ok(&["run", "recipe.toml"]);
    let out = s.rudder(&["report", "recipe.toml", "-o", "report.html"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let html = s.read("report.html");

    // Self-contained: nothing to fetch, no script.
    for needle in ["<script", "<link", " src=", "@import", "https://"] {
        assert!(!html.contains(needle), "the report holds {needle:?}");
    }
    // `url(#marker)` refers to the page itself.
    assert!(
        html.match_indices("url(")
            .all(|(at, _)| html[at..].starts_with("url(#"))
    );
    assert!(html.contains("id=\"pipeline\"") && html.contains("<svg"));

    // One chart per (kind, metric); the two DPO stages share each of theirs.
    let figures = figures(&html);
    let dpo_loss = figures
        .iter()
        .find(|f| f.metric == "loss" && f.series.len() == 2)
        .expect("a loss chart overlaying both DPO stages");
    let names: Vec<&str> = dpo_loss.series.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["sigmoid", "ipo"]);
    for metric in ["rewards/margins", "rewards/accuracies", "grad_norm"] {
        assert!(
            figures
                .iter()
                .any(|f| f.metric == metric && f.series.len() == 2),
            "a {metric} chart of both DPO stages"
        );
    }
    assert!(
        figures
            .iter()
            .any(|f| f.metric == "mean_token_accuracy" && f.series.len() == 1),
        "the SFT stage's own chart"
    );
    for Figure {
        metric,
        series,
        svg,
    } in &figures
    {
        let strokes = polyline_strokes(svg);
        for (node, color) in series {
            assert_eq!(
                strokes.iter().filter(|s| *s == color).count(),
                1,
                "chart {metric}: one line for {node}"
            );
        }
        let texts = svg_texts(svg);
        assert!(texts.contains(metric), "y label of {metric}: {texts:?}");
        assert!(texts.iter().any(|t| t == "step"), "x label of {metric}");
    }

    // Parameters against the kind's defaults: set ones highlighted, defaults folded away.
    let ipo_at = html.find("id=\"node-ipo\"").unwrap();
    let ipo = unescape(element(&html, ipo_at, "details"));
    let row = |name: &str, value: &str, default: &str| {
        format!(
            "<tr class=\"changed\"><td class=\"mono\">{name}</td><td class=\"mono\">{value}</td><td class=\"mono muted\">{default}</td><td>recipe</td></tr>"
        )
    };
    assert!(
        ipo.contains(&row("loss_type", "\"ipo\"", "\"sigmoid\"")),
        "{ipo}"
    );
    assert!(
        ipo.contains(&row("learning_rate", "0.001", "1e-6")),
        "{ipo}"
    );
    // Left at its default: folded away, not highlighted.
    let folded = &ipo[ipo.find("more at the kind's defaults").expect(&ipo)..];
    assert!(folded.contains("<td class=\"mono\">beta</td><td class=\"mono\">0.1</td>"));

    // The evaluation table and a sample of completions per model.
    let eval_at = html
        .find("<table class=\"eval\">")
        .expect("an evaluation table");
    let table = element(&html, eval_at, "table");
    assert!(table.contains("<td>sigmoid</td>") && table.contains("<td>ipo</td>"));
    assert!(table.contains(">win_rate<") && table.contains(">kl<"));
    assert!(html.contains("<table class=\"samples\">"));
    assert!(html.contains("Question: What color is grass?"));

    // Sizes per stage.
    assert!(html.contains("id=\"store\""));
    assert!(unescape(&html).contains("the recipe's artifacts, each counted once"));

    // What the last run did, as `status` says it.
    let status = s.ok(&["status", "recipe.toml"]);
    assert!(status.contains("last finished run"), "{status}");
    assert!(status.contains(": success; ran"), "{status}");
    for stage in ["sft", "sigmoid/ref_logps", "sigmoid", "ipo", "eval"] {
        assert!(
            status.lines().any(|l| l.trim_start().starts_with(stage)),
            "{stage} in {status}"
        );
    }

    // The page in a browser: no console error, no request, every chart drawn.
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("RUDDER_REQUIRE_CHROMIUM").is_none(),
            "RUDDER_REQUIRE_CHROMIUM is set but Chromium was not found"
        );
        eprintln!(
            "skipping the browser check: Chromium not found (apt-get install -y chromium, or set CHROMIUM)"
        );
        return;
    };
    let shot = s.path("report.png");
    let out = Command::new("python3")
        .arg(script("check_report.py"))
        .arg(s.path("report.html"))
        .arg("--screenshot")
        .arg(&shot)
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check_report.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(seen["console"], serde_json::json!([]), "console messages");
    assert_eq!(seen["requests"], serde_json::json!([]), "requests");
    assert!(out.status.success());
    let charts = seen["charts"].as_array().unwrap();
    assert_eq!(charts.len(), figures.len());
    for chart in charts {
        assert!(chart["width"].as_f64().unwrap() > 300.0, "{chart}");
        let strokes: Vec<&str> = chart["polylines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for series in chart["series"].as_array().unwrap() {
            let color = series["color"].as_str().unwrap();
            assert_eq!(
                strokes.iter().filter(|s| **s == color).count(),
                1,
                "{chart}"
            );
        }
        let texts: Vec<&str> = chart["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(texts.contains(&chart["metric"].as_str().unwrap()) && texts.contains(&"step"));
    }
    // A PNG of the whole page (the plots are most of it).
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 50_000, "a screenshot of {} bytes", png.len());
}

/// Every event file scalar of an artifact against its metrics.jsonl.
fn check_events(dir: &Path) {
    let events_file = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("tfevents"))
        .unwrap_or_else(|| panic!("an event file in {}", dir.display()));
    let events = rudder_engine::tfevents::read(&events_file).unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events.len(),
        lines.len() + 1,
        "a file-version event, then one per line"
    );
    for (event, line) in events[1..].iter().zip(&lines) {
        assert_eq!(event.step, line["step"].as_i64().unwrap());
        let Some(rudder_engine::tfevents::What::Summary(summary)) = &event.what else {
            panic!("a summary event");
        };
        for value in &summary.value {
            let name = value.tag.strip_prefix("train/").unwrap();
            let expected = line[name].as_f64().unwrap() as f32;
            assert_eq!(
                value.simple_value(),
                Some(expected),
                "{name} at step {}",
                event.step
            );
        }
        assert!(
            summary
                .value
                .iter()
                .any(|v| v.tag == "train/rewards/margins")
        );
        // Every logged number is a scalar, zeros included.
        let numbers = line
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, v)| *k != "step" && v.is_number())
            .count();
        assert_eq!(summary.value.len(), numbers, "at step {}", event.step);
    }
}

#[test]
fn compare_names_what_changed_and_tensorboard_files_match_the_metrics() {
    let s = scratch(RECIPE);
    s.ok(&["run", "recipe.toml"]);
    std::fs::copy(s.path("recipe.lock"), s.path("before.lock")).unwrap();

    // Event files beside metrics.jsonl; report_to is in no key.
    for stage in ["sigmoid", "ipo"] {
        let dir = s.ok(&["show", "recipe.toml", stage, "--path"]);
        check_events(Path::new(dir.trim()));
    }
    let keys = |recipe: &str| -> Vec<(String, String, String)> {
        s.plan(recipe)
            .into_iter()
            .map(|n| (n.0, n.1, n.2))
            .collect()
    };
    s.write(
        "plain.toml",
        &RECIPE.replace("report_to = [\"tensorboard\"]\n", ""),
    );
    let with = keys("recipe.toml");
    assert_eq!(keys("plain.toml"), with, "report_to changes no key");
    assert!(with.iter().all(|n| n.1 == "cached"), "{with:?}");
    if let Some(python) = std::env::var_os("RUDDER_TENSORBOARD_PYTHON") {
        let dirs: Vec<String> = ["sigmoid", "ipo"]
            .iter()
            .map(|stage| {
                s.ok(&["show", "recipe.toml", stage, "--path"])
                    .trim()
                    .to_owned()
            })
            .collect();
        let out = Command::new(python)
            .arg(script("check_tensorboard.py"))
            .args(&dirs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "TensorBoard's reader disagrees:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!(
            "skipping TensorBoard's own reader: set RUDDER_TENSORBOARD_PYTHON to a Python with the tensorboard package"
        );
    }

    // A changed beta, against the lockfile of the run before it.
    s.ok(&["run", "recipe.toml", "--set", "stages.ipo.beta=0.2"]);
    let text = s.ok(&[
        "report",
        "recipe.toml",
        "--set",
        "stages.ipo.beta=0.2",
        "--compare",
        "before.lock",
        "--format",
        "text",
    ]);
    let comparison = &text[text.find("compared with before.lock:").expect(&text)..];
    assert!(comparison.contains("changed  ipo (dpo)"), "{comparison}");
    assert!(comparison.contains("    beta: 0.1 -> 0.2"), "{comparison}");
    assert!(comparison.contains("    loss "), "{comparison}");
    assert!(
        comparison.contains("changed  eval (evaluate)"),
        "{comparison}"
    );
    assert!(comparison.contains("input models[1]: "), "{comparison}");
    let unchanged = comparison
        .lines()
        .find(|l| l.starts_with("unchanged: "))
        .unwrap();
    for same in ["sft", "sigmoid", "ipo/ref_logps", "prefs"] {
        assert!(unchanged.contains(same), "{unchanged}");
    }

    // The same against another recipe, in the HTML page.
    s.write(
        "beta.toml",
        &RECIPE.replace("loss_type = \"ipo\"", "loss_type = \"ipo\"\nbeta = 0.2"),
    );
    s.ok(&[
        "report",
        "recipe.toml",
        "--compare",
        "beta.toml",
        "-o",
        "compare.html",
    ]);
    let html = s.read("compare.html");
    let at = html
        .find("id=\"comparison\"")
        .expect("a comparison section");
    let section = unescape(element(&html, at, "section"));
    assert!(section.contains("Comparison with beta.toml"));
    assert!(section.contains(
        "<tr class=\"changed\"><td class=\"mono\">beta</td><td class=\"mono\">0.2</td><td class=\"mono\">0.1</td></tr>"
    ), "{section}");

    // A missing lockfile is a usage error.
    let out = s.rudder(&["report", "recipe.toml", "--compare", "nope.lock"]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
}

#[test]
fn status_sees_a_run_from_another_process_and_tells_a_killed_one() {
    // Enough steps to be caught in the middle.
    let recipe = RECIPE.replace(
        "batch_size = 8\nepochs = 1\nlogging_steps = 1",
        "batch_size = 1\nepochs = 500\nlogging_steps = 5\ncheckpoint_every = 50",
    );
    let s = scratch(&recipe);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(["run", "recipe.toml", "--until", "sft"])
        .current_dir(s.dir.path())
        .env_remove("RUDDER_STORE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let seen = loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "status never saw the stage move"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended first");
        let status: Value =
            serde_json::from_str(&s.ok(&["status", "recipe.toml", "--json"])).unwrap();
        let position = status["live"]["progress"]["sft"]["position"]
            .as_u64()
            .unwrap_or(0);
        if position >= 20 && status["live"]["metrics"]["sft"]["loss"].is_number() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let live = &seen["live"];
    assert_eq!(live["alive"], true);
    assert_eq!(live["pid"], child.id());
    assert_eq!(live["stages"][0]["name"], "sft");
    assert_eq!(live["stages"][0]["state"], "running");
    let progress = &live["progress"]["sft"];
    assert_eq!(progress["length"], 8000);
    assert!(progress["message"].as_str().unwrap().starts_with("loss "));
    assert!(progress["eta_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        live["pending"]["sft"]
            .as_str()
            .unwrap()
            .contains(".rudder/tmp/")
    );
    let text = s.ok(&["status", "recipe.toml"]);
    assert!(text.contains("running (pid"), "{text}");
    assert!(text.contains("  running  sft"), "{text}");
    assert!(text.contains("/8000 ("), "{text}");
    assert!(text.contains("ETA "), "{text}");

    child.kill().unwrap();
    child.wait().unwrap();
    let text = s.ok(&["status", "recipe.toml"]);
    assert!(
        text.contains("ended without finishing: it was killed"),
        "{text}"
    );
    assert!(text.contains("  stopped  sft"), "{text}");
    assert!(text.contains("/8000 ("), "where it stopped: {text}");
    let status: Value = serde_json::from_str(&s.ok(&["status", "recipe.toml", "--json"])).unwrap();
    assert_eq!(status["live"]["alive"], false);
    assert!(status["last"].is_null());
}
