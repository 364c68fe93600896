//! Sharing artifacts through remote stores, end to end through the `rudder` binary: against a
//! real S3-compatible server (moto's, started here on the loopback) and a shared directory.
//! push from one store and pull into an empty one, after which the recipe runs nothing;
//! concurrent pushes; a killed push; a corrupt object; `run --remote`; `gc --remote`; a remote
//! that is down.
//!
//! The S3 tests need `python3 -m moto.server` (`pip install "moto[server]"`; the Python is
//! `RUDDER_MOTO_PYTHON`, else `target/ci-venv/bin/python`, else `python3`). Without it they say
//! so and pass, unless `RUDDER_REQUIRE_S3` is set (as `.ci/run` does), when they fail.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Scratch;

// ---------------------------------------------------------------------------------------------
// The S3 server.

struct Moto {
    port: u16,
    /// The server stops when this closes, that is when the test process ends.
    _stdin: ChildStdin,
    _child: Child,
}

fn moto_python() -> PathBuf {
    if let Some(python) = std::env::var_os("RUDDER_MOTO_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

fn start_moto() -> Result<Moto, String> {
    let python = moto_python();
    let probe = Command::new(&python)
        .args(["-c", "import moto.server, flask"])
        .output()
        .map_err(|e| format!("{} does not run ({e})", python.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "{} cannot import moto.server (pip install \"moto[server]\")",
            python.display()
        ));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))?;
    // `cat` returns when the test process (the pipe's other end) is gone, and the server with it.
    let script = format!(
        "\"$0\" -m moto.server -H 127.0.0.1 -p {port} >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid"
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .arg(&python)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    let stdin = child.stdin.take().expect("piped");
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("the moto server did not start listening within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Moto {
        port,
        _stdin: stdin,
        _child: child,
    })
}

/// The server, started once for this test process; `None` (after saying why) when it cannot
/// run here.
fn moto() -> Option<&'static Moto> {
    static MOTO: OnceLock<Result<Moto, String>> = OnceLock::new();
    match MOTO.get_or_init(start_moto) {
        Ok(moto) => Some(moto),
        Err(why) if std::env::var_os("RUDDER_REQUIRE_S3").is_some() => {
            panic!("RUDDER_REQUIRE_S3 is set, but {why} (.ci/run installs moto[server])")
        }
        Err(why) => {
            eprintln!("skipping an S3 test: {why}");
            None
        }
    }
}

/// One plain HTTP request to the server: status and body. moto checks no signature, but serves
/// objects only to a request that names its credentials.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nAuthorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, response[split + 4..].to_vec())
}

/// A bucket of its own for one test.
fn bucket(moto: &Moto, name: &str) -> String {
    let bucket = format!("{name}-{}", std::process::id());
    let (status, body) = http(moto.port, "PUT", &format!("/{bucket}"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    bucket
}

/// Keys of the objects under `prefix` in `bucket`, with their sizes.
fn list(moto: &Moto, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
    let (status, body) = http(
        moto.port,
        "GET",
        &format!("/{bucket}?list-type=2&prefix={prefix}"),
        b"",
    );
    assert_eq!(status, 200);
    let body = String::from_utf8(body).unwrap();
    body.split("<Contents>")
        .skip(1)
        .map(|entry| {
            let field = |name: &str| {
                entry
                    .split(&format!("<{name}>"))
                    .nth(1)
                    .and_then(|rest| rest.split(&format!("</{name}>")).next())
                    .unwrap()
                    .to_owned()
            };
            (field("Key"), field("Size").parse().unwrap())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running rudder.

/// The environment every rudder of these tests runs in: credentials and endpoint for the S3
/// server (never in a recipe), and a configuration file of the scratch's own.
fn env_for(port: Option<u16>, config: &Path) -> Vec<(String, String)> {
    let mut env = vec![("RUDDER_CONFIG".to_owned(), config.display().to_string())];
    if let Some(port) = port {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ] {
            env.push((k.to_owned(), v));
        }
    }
    env
}

struct Site {
    scratch: Scratch,
    env: Vec<(String, String)>,
}

impl Site {
    /// A checkout of the recipe: its files, and an empty store.
    fn new(files: &[(&str, &[u8])], port: Option<u16>) -> Site {
        let scratch = Scratch::new();
        for (name, bytes) in files {
            let path = scratch.path(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let env = env_for(port, &scratch.path("config.toml"));
        Site { scratch, env }
    }

    /// Another checkout of the same files (the recipe, its data and its lockfile), with an
    /// empty store and a configuration file of its own, as a colleague who clones the
    /// repository has.
    fn clone_checkout(&self) -> Site {
        let scratch = Scratch::new();
        for name in ["recipe.toml", "recipe.lock", "raw.txt", "sft.jsonl"] {
            if let Ok(bytes) = std::fs::read(self.scratch.path(name)) {
                std::fs::write(scratch.path(name), bytes).unwrap();
            }
        }
        if self.scratch.path("model").is_dir() {
            std::fs::create_dir_all(scratch.path("model")).unwrap();
            for entry in std::fs::read_dir(self.scratch.path("model")).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), scratch.path("model").join(entry.file_name())).unwrap();
            }
        }
        let config = scratch.path("config.toml").display().to_string();
        let env = self
            .env
            .iter()
            .map(|(k, v)| match k.as_str() {
                "RUDDER_CONFIG" => (k.clone(), config.clone()),
                _ => (k.clone(), v.clone()),
            })
            .collect();
        Site { scratch, env }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rudder"));
        command
            .args(args)
            .current_dir(self.scratch.dir.path())
            .env_remove("RUDDER_STORE")
            .env_remove("RUDDER_REMOTE")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    fn rudder(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("rudder runs")
    }

    /// Runs and asserts success; returns stdout and stderr.
    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.rudder(args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "rudder {args:?} failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status.code()
        );
        (stdout, stderr)
    }

    /// `plan --json` states by node.
    fn states(&self, extra: &[&str]) -> Vec<(String, String)> {
        let mut args = vec!["plan", "recipe.toml", "--json"];
        args.extend_from_slice(extra);
        let json: serde_json::Value = serde_json::from_str(&self.ok(&args).0).unwrap();
        json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["kind"] != "dataset" && n["kind"] != "model")
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_owned(),
                    n["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    fn artifact(&self, node: &str, file: &str) -> Vec<u8> {
        let dir = self.ok(&["show", "recipe.toml", node, "--path"]).0;
        std::fs::read(Path::new(dir.trim()).join(file)).unwrap()
    }

    fn objects(&self) -> usize {
        self.scratch.objects()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn states(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Recipes.

/// raw -> upper -> count, and `other`; `remotes` is the recipe's `[remotes]` part.
fn commands_recipe(remotes: &str) -> String {
    format!(
        r#"
[recipe]
name = "pipeline"

{remotes}

[datasets.raw]
path = "raw.txt"

[stages.upper]
kind = "command"
inputs = ["raw"]
cmd = "tr a-z A-Z < {{{{ inputs.raw }}}} > {{{{ out }}}}/upper.txt; head -c 300000 /dev/zero | tr '\\0' x > {{{{ out }}}}/pad.bin"
outputs = {{ text = "upper.txt" }}

[stages.count]
kind = "command"
inputs = ["upper.text"]
cmd = "wc -l < {{{{ inputs['upper.text'] }}}} > {{{{ out }}}}/count.txt"
outputs = {{ count = "count.txt" }}

[stages.other]
kind = "command"
cmd = "echo independent > {{{{ out }}}}/other.txt"
outputs = {{ other = "other.txt" }}
"#
    )
}

fn commands_site(remotes: &str, port: Option<u16>) -> Site {
    Site::new(
        &[
            ("recipe.toml", commands_recipe(remotes).as_bytes()),
            ("raw.txt", b"alpha\nbeta\n"),
        ],
        port,
    )
}

fn s3_remote(bucket: &str) -> String {
    format!("[remotes.team]\nurl = \"s3://{bucket}/rudder\"\ndefault = true\n")
}

/// Data preparation, a 3-step SFT stage on the fixture model, and a command on its output.
fn training_site(remotes: &str, port: Option<u16>) -> Site {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for file in [
        "policy/config.json",
        "policy/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ] {
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        files.push((
            format!("model/{name}"),
            std::fs::read(fixtures.join(file)).unwrap(),
        ));
    }
    files.push((
        "sft.jsonl".into(),
        std::fs::read(fixtures.join("sft.jsonl")).unwrap(),
    ));
    let recipe = format!(
        r#"
[recipe]
seed = 1

{remotes}

[models.base]
hf = "model"

[datasets.instructions]
path = "sft.jsonl"

[stages.prep]
kind = "command"
inputs = ["instructions"]
cmd = "head -n 12 {{{{ inputs.instructions }}}} > {{{{ out }}}}/train.jsonl"
outputs = {{ train = "train.jsonl" }}

[stages.sft]
kind = "sft"
model = "base"
data = "prep.train"
learning_rate = 1e-3
batch_size = 4
max_steps = 3
logging_steps = 1
shuffle = false
lr_scheduler_type = "constant"

[stages.size]
kind = "command"
inputs = ["sft"]
cmd = "wc -c < {{{{ inputs.sft }}}}/model.safetensors > {{{{ out }}}}/size.txt"
outputs = {{ size = "size.txt" }}
"#
    );
    files.push(("recipe.toml".into(), recipe.into_bytes()));
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    Site::new(&borrowed, port)
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn s3_push_from_one_store_pull_into_an_empty_one_then_nothing_runs() {
    let Some(moto) = moto() else { return };
    let bucket = bucket(moto, "roundtrip");
    let a = training_site(&s3_remote(&bucket), Some(moto.port));
    a.ok(&["run", "recipe.toml"]);
    let (stdout, stderr) = a.ok(&["push", "recipe.toml"]);
    assert!(stderr.contains("pushed 3 artifacts to team"), "{stderr}");
    assert_eq!(stdout.matches("pushed").count(), 3, "{stdout}");
    // Credentials and endpoint came from the environment: neither is in what was pushed.
    let objects = list(moto, &bucket, "rudder/");
    assert!(
        objects
            .iter()
            .any(|(k, _)| k == "rudder/rudder-remote.json")
    );
    assert_eq!(
        objects
            .iter()
            .filter(|(k, _)| k.starts_with("rudder/artifacts/"))
            .count(),
        3
    );
    // A second push has nothing to do.
    let (_, stderr) = a.ok(&["push", "recipe.toml"]);
    assert!(stderr.contains("3 artifacts are on team"), "{stderr}");

    let b = a.clone_checkout();
    assert_eq!(
        b.states(&[]),
        states(&[("prep", "run"), ("sft", "run"), ("size", "run")])
    );
    assert_eq!(
        b.states(&["--remote", "team"]),
        states(&[("prep", "remote"), ("sft", "remote"), ("size", "remote")])
    );
    let (stdout, stderr) = b.ok(&["pull", "recipe.toml"]);
    assert_eq!(stdout.matches("pulled").count(), 3, "{stdout}");
    assert!(stderr.contains("pulled 3 artifacts from team"), "{stderr}");
    let (_, stderr) = b.ok(&["run", "recipe.toml"]);
    assert!(stderr.contains("ran 0 stages, 3 cached"), "{stderr}");
    assert_eq!(
        b.artifact("sft", "model.safetensors"),
        a.artifact("sft", "model.safetensors")
    );
    // Pulled artifacts are committed as built ones are: read-only, and intact when hashed.
    let model = Path::new(b.ok(&["show", "recipe.toml", "sft", "--path"]).0.trim())
        .join("model.safetensors");
    let mode = std::fs::metadata(&model).unwrap().permissions().mode();
    assert_eq!(mode & 0o222, 0, "{} is writable", model.display());
    let (_, stderr) = b.ok(&["verify", "recipe.toml"]);
    assert!(
        stderr.contains("verified 3 artifacts") && stderr.contains("all intact"),
        "{stderr}"
    );
    assert_eq!(b.scratch.read("recipe.lock"), a.scratch.read("recipe.lock"));
    // The pulled model is a model: it generates, as the one it was built from does.
    let generate = [
        "generate",
        "recipe.toml",
        "sft",
        "--prompt",
        "Hello",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--json",
    ];
    assert_eq!(b.ok(&generate).0, a.ok(&generate).0);
}

#[test]
fn s3_pull_of_selected_nodes_takes_what_they_need() {
    let Some(moto) = moto() else { return };
    let bucket = bucket(moto, "select");
    let a = commands_site(&s3_remote(&bucket), Some(moto.port));
    a.ok(&["run", "recipe.toml"]);
    // `count` and what it needs (`upper`); not `other`.
    let (stdout, _) = a.ok(&["push", "recipe.toml", "count"]);
    assert_eq!(stdout.trim().lines().count(), 2, "{stdout}");
    let b = a.clone_checkout();
    let out = b.rudder(&["pull", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not on remote team (s3://")
            && text(&out.stderr).contains(": other"),
        "{}",
        text(&out.stderr)
    );
    // What was there was pulled all the same.
    assert_eq!(
        b.states(&[]),
        states(&[("upper", "cached"), ("count", "cached"), ("other", "run")])
    );
    let out = b.rudder(&["pull", "recipe.toml", "cuont"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("did you mean `count`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn s3_two_concurrent_pushes_of_one_recipe_both_succeed_and_one_artifact_stays_whole() {
    let Some(moto) = moto() else { return };
    let bucket = bucket(moto, "race");
    // The same key built twice gives different bytes (the stage records when it ran), so a
    // mix of the two pushes would show.
    let recipe = commands_recipe(&s3_remote(&bucket)).replace(
        "echo independent > {{ out }}/other.txt",
        "date +%s%N > {{ out }}/other.txt; head -c 3000000 /dev/urandom > {{ out }}/noise.bin",
    );
    let sites: Vec<Site> = (0..2)
        .map(|_| {
            Site::new(
                &[
                    ("recipe.toml", recipe.as_bytes()),
                    ("raw.txt", b"alpha\nbeta\n"),
                ],
                Some(moto.port),
            )
        })
        .collect();
    for site in &sites {
        site.ok(&["run", "recipe.toml"]);
    }
    assert_ne!(
        sites[0].artifact("other", "other.txt"),
        sites[1].artifact("other", "other.txt")
    );
    let children: Vec<Child> = sites
        .iter()
        .map(|site| {
            site.command(&["push", "recipe.toml"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let manifests = list(moto, &bucket, "rudder/artifacts/");
    assert_eq!(manifests.len(), 3, "{manifests:?}");
    let c = sites[0].clone_checkout();
    c.ok(&["pull", "recipe.toml"]);
    let pulled = (
        c.artifact("other", "other.txt"),
        c.artifact("other", "noise.bin"),
    );
    assert!(
        sites.iter().any(|s| (
            s.artifact("other", "other.txt"),
            s.artifact("other", "noise.bin")
        ) == pulled),
        "the pulled artifact is one push's, whole"
    );
}

/// `other` holds one small file and two large ones (transferred in parts): the small one is
/// across long before the large ones.
fn large_site(moto: &Moto, bucket: &str) -> Site {
    let recipe = commands_recipe(&s3_remote(bucket)).replace(
        "echo independent > {{ out }}/other.txt",
        "echo small > {{ out }}/other.txt; head -c 50000000 /dev/urandom > {{ out }}/a.bin; head -c 50000000 /dev/urandom > {{ out }}/b.bin",
    );
    Site::new(
        &[
            ("recipe.toml", recipe.as_bytes()),
            ("raw.txt", b"alpha\nbeta\n"),
        ],
        Some(moto.port),
    )
}

#[test]
fn s3_a_killed_push_leaves_no_artifact_and_the_next_push_completes() {
    let Some(moto) = moto() else { return };
    let bucket = bucket(moto, "killed");
    let a = large_site(moto, &bucket);
    a.ok(&["run", "recipe.toml"]);
    let mut push = a
        .command(&["push", "recipe.toml", "other"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while list(moto, &bucket, "rudder/blobs/").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no blob was uploaded"
        );
        assert!(
            push.try_wait().unwrap().is_none(),
            "the push ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    push.kill().unwrap();
    push.wait().unwrap();
    assert!(
        list(moto, &bucket, "rudder/artifacts/").is_empty(),
        "a killed push published an artifact"
    );
    let b = a.clone_checkout();
    assert_eq!(
        b.states(&["--remote", "team"])[2],
        ("other".into(), "run".into())
    );
    let (_, stderr) = a.ok(&["push", "recipe.toml", "other"]);
    assert!(stderr.contains("pushed 1 artifact to team"), "{stderr}");
    assert!(
        stderr.contains("already there"),
        "blobs of the killed push are reused: {stderr}"
    );
    b.ok(&["pull", "recipe.toml", "other"]);
    assert_eq!(b.artifact("other", "b.bin"), a.artifact("other", "b.bin"));
}

#[test]
fn s3_a_killed_pull_resumes_without_fetching_verified_files_again() {
    let Some(moto) = moto() else { return };
    let bucket = bucket(moto, "resume");
    let a = large_site(moto, &bucket);
    a.ok(&["run", "recipe.toml"]);
    a.ok(&["push", "recipe.toml", "other"]);
    let b = a.clone_checkout();
    let mut pull = b
        .command(&["pull", "recipe.toml", "other"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cache = b.scratch.path(".rudder/cache/pull");
    let verified = || {
        std::fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".part"))
            .count()
    };
    let start = Instant::now();
    while verified() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing was fetched"
        );
        assert!(
            pull.try_wait().unwrap().is_none(),
            "the pull ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    pull.kill().unwrap();
    pull.wait().unwrap();
    assert_eq!(b.objects(), 0, "a killed pull committed an artifact");
    let (_, stderr) = b.ok(&["pull", "recipe.toml", "other"]);
    assert!(stderr.contains("fetched by an earlier pull"), "{stderr}");
    assert_eq!(b.artifact("other", "a.bin"), a.artifact("other", "a.bin"));
    assert!(
        !cache.exists() || verified() == 0,
        "the pull cache is emptied"
    );
}

#[test]
fn s3_a_flipped_byte_on_the_remote_is_reported_and_never_enters_the_store() {
    let Some(moto) = moto() else { return };
    let bucket = bucket(moto, "corrupt");
    let a = commands_site(&s3_remote(&bucket), Some(moto.port));
    a.ok(&["run", "recipe.toml"]);
    a.ok(&["push", "recipe.toml"]);
    // pad.bin, upper's largest file.
    let (key, _) = list(moto, &bucket, "rudder/blobs/")
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .unwrap();
    let (status, mut bytes) = http(moto.port, "GET", &format!("/{bucket}/{key}"), b"");
    assert_eq!(status, 200);
    bytes[1234] ^= 0x20;
    let (status, body) = http(moto.port, "PUT", &format!("/{bucket}/{key}"), &bytes);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let b = a.clone_checkout();
    let out = b.rudder(&["pull", "recipe.toml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`pad.bin` of upper") && stderr.contains("is corrupt on the remote"),
        "{stderr}"
    );
    assert!(stderr.contains("its BLAKE3 is"), "{stderr}");
    // `count` needs `upper`'s artifact but is an artifact of its own, and intact: pulled.
    assert_eq!(
        b.states(&[]),
        states(&[("upper", "run"), ("count", "cached"), ("other", "cached")])
    );
    assert_eq!(b.objects(), 2);
    // `run --remote` builds what the remote cannot give, with a warning.
    let (_, stderr) = b.ok(&[
        "run",
        "recipe.toml",
        "--remote",
        "team",
        "--remote-cache",
        "read",
    ]);
    assert!(
        stderr.contains("warning") && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(stderr.contains("ran 1 stage"), "{stderr}");
}

#[test]
fn run_with_a_remote_builds_only_what_the_remote_lacks_and_pushes_it() {
    for remote in ["s3", "dir"] {
        let (site, remote_arg) = match remote {
            "s3" => {
                let Some(moto) = moto() else { continue };
                let bucket = bucket(moto, "readthrough");
                (
                    commands_site(&s3_remote(&bucket), Some(moto.port)),
                    "team".to_owned(),
                )
            }
            _ => {
                let site = commands_site("", None);
                let dir = site.scratch.path("shared-store");
                (site, dir.display().to_string())
            }
        };
        site.ok(&["run", "recipe.toml"]);
        site.ok(&["push", "recipe.toml", "upper", "--remote", &remote_arg]);
        let b = site.clone_checkout();
        assert_eq!(
            b.states(&["--remote", &remote_arg]),
            states(&[("upper", "remote"), ("count", "run"), ("other", "run")])
        );
        // A forced stage is built, not fetched; an input a selection leaves out is fetched.
        assert_eq!(
            b.states(&["--remote", &remote_arg, "--force", "upper"])[0],
            ("upper".to_owned(), "run".to_owned())
        );
        assert_eq!(
            b.states(&["--remote", &remote_arg, "--only", "count"]),
            states(&[("upper", "remote"), ("count", "run")])
        );
        let (_, stderr) = b.ok(&["run", "recipe.toml", "--remote", &remote_arg]);
        assert!(stderr.contains("pulled upper from"), "{remote}: {stderr}");
        assert!(
            stderr.contains("ran 2 stages, 0 cached, 1 pulled"),
            "{remote}: {stderr}"
        );
        assert!(stderr.contains("pushed 2 artifacts"), "{remote}: {stderr}");
        assert_eq!(b.artifact("count", "count.txt"), b"2\n");
        // Everything is on the remote now.
        let c = site.clone_checkout();
        let (_, stderr) = c.ok(&["run", "recipe.toml", "--remote", &remote_arg]);
        assert!(
            stderr.contains("ran 0 stages, 0 cached, 3 pulled"),
            "{remote}: {stderr}"
        );
        // The recipe's `remote_cache = "read"` does the same without --remote, and never writes.
        if remote == "s3" {
            let d = site.clone_checkout();
            let recipe = d.scratch.read("recipe.toml").replace(
                "name = \"pipeline\"",
                "name = \"pipeline\"\nremote_cache = \"read\"",
            );
            d.scratch
                .write("recipe.toml", &recipe.replace("independent", "changed"));
            let (_, stderr) = d.ok(&["run", "recipe.toml"]);
            assert!(
                stderr.contains("ran 1 stage, 0 cached, 2 pulled"),
                "{stderr}"
            );
            assert!(!stderr.contains("pushed"), "{stderr}");
        }
    }
}

#[test]
fn a_shared_directory_from_the_configuration_file_round_trips() {
    let a = commands_site("", None);
    let shared = a.scratch.path("nfs/rudder");
    a.scratch.write(
        "config.toml",
        &format!(
            "[remotes.nfs]\nurl = \"{}\"\ndefault = true\n",
            shared.display()
        ),
    );
    a.ok(&["run", "recipe.toml"]);
    let (_, stderr) = a.ok(&["push", "recipe.toml"]);
    assert!(
        stderr.contains("from") && stderr.contains("config.toml"),
        "{stderr}"
    );
    assert!(shared.join("rudder-remote.json").is_file());
    let b = a.clone_checkout();
    // The colleague names the same directory with a file:// URL.
    let url = format!("file://{}", shared.display());
    b.ok(&["pull", "recipe.toml", "--remote", &url]);
    let (_, stderr) = b.ok(&["run", "recipe.toml"]);
    assert!(stderr.contains("ran 0 stages, 3 cached"), "{stderr}");
    // A flipped byte in the shared directory is caught the same way.
    let blob = files_under(&shared.join("blobs"))
        .into_iter()
        .find(|f| std::fs::read(f).unwrap() == b"independent\n")
        .expect("other.txt's blob");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let c = a.clone_checkout();
    let out = c.rudder(&["pull", "recipe.toml", "other", "--remote", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("`other.txt` of other"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(c.objects(), 0);
}

/// Appends to an artifact's file, as a user with a text editor would (root ignores the
/// read-only bit anyway).
fn damage(site: &Site, node: &str, file: &str) {
    let dir = site.ok(&["show", "recipe.toml", node, "--path"]).0;
    let path = Path::new(dir.trim()).join(file);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"SMUGGLED\n")
        .unwrap();
}

fn quarantined(site: &Site) -> usize {
    std::fs::read_dir(site.scratch.path(".rudder/quarantine"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `plan --json` (with `extra`): the state and reasons of `node`.
fn planned(site: &Site, node: &str, extra: &[&str]) -> (String, Vec<String>) {
    let mut args = vec!["plan", "recipe.toml", "--json"];
    args.extend_from_slice(extra);
    let json: serde_json::Value = serde_json::from_str(&site.ok(&args).0).unwrap();
    let entry = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()
        .clone();
    let reasons = entry["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    (entry["state"].as_str().unwrap().to_owned(), reasons)
}

#[test]
fn a_corrupted_artifact_is_never_pushed_and_a_run_fetches_it_again_instead_of_building_it() {
    let a = commands_site("", None);
    let shared = a.scratch.path("shared").display().to_string();
    a.ok(&["run", "recipe.toml"]);
    a.ok(&["push", "recipe.toml", "--remote", &shared]);
    // An artifact damaged in the store is refused by a push to a remote that lacks it, which
    // names the file, uploads nothing, and says how to repair it.
    damage(&a, "upper", "upper.txt");
    let fresh = a.scratch.path("fresh");
    let out = a.rudder(&[
        "push",
        "recipe.toml",
        "--remote",
        &fresh.display().to_string(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("corrupted in the local store, so not pushed: upper (")
            && stderr.contains("file upper.txt: digest mismatch")
            && stderr.contains("`rudder run` moves it to quarantine"),
        "{stderr}"
    );
    assert!(
        files_under(&fresh)
            .iter()
            .all(|f| !f.starts_with(fresh.join("artifacts")))
    );
    assert!(!fresh.join("blobs").exists(), "nothing was uploaded");

    // A colleague's store, pulled whole, then damaged: the plan fetches the artifact from the
    // remote rather than building it, and says why (in text and in JSON).
    let b = a.clone_checkout();
    b.ok(&["pull", "recipe.toml", "--remote", &shared]);
    b.ok(&["verify", "recipe.toml"]);
    damage(&b, "upper", "upper.txt");
    assert_eq!(
        planned(&b, "upper", &[]),
        (
            "run".into(),
            vec!["corrupted (file upper.txt: digest mismatch)".into()]
        )
    );
    assert_eq!(
        planned(&b, "upper", &["--remote", &shared]),
        (
            "remote".into(),
            vec![
                "corrupted (file upper.txt: digest mismatch)".into(),
                format!("on remote {shared}")
            ]
        )
    );
    let (plan, _) = b.ok(&["plan", "recipe.toml", "--remote", &shared]);
    assert!(
        plan.contains("0 to run, 2 cached, 1 to fetch from the remote"),
        "{plan}"
    );
    let (_, stderr) = b.ok(&[
        "run",
        "recipe.toml",
        "--remote",
        &shared,
        "--remote-cache",
        "read",
    ]);
    assert!(
        stderr.contains(
            "warning: the artifact of `upper` is corrupted (file upper.txt: digest mismatch): moved to"
        ) && stderr.contains("and pulled again"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ran 0 stages, 2 cached, 1 pulled"),
        "{stderr}"
    );
    assert_eq!(b.artifact("upper", "upper.txt"), b"ALPHA\nBETA\n");
    assert_eq!(quarantined(&b), 1);
    b.ok(&["verify", "recipe.toml"]);

    // Damage the cheap check cannot see (another digest recorded, every stat as it was) is
    // found by --verify full, which the fetch honours too.
    let dir = b.ok(&["show", "recipe.toml", "count", "--path"]).0;
    let manifest_path = Path::new(dir.trim()).join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["files"][0]["blake3"] = serde_json::Value::String("0".repeat(64));
    std::fs::set_permissions(&manifest_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    assert_eq!(planned(&b, "count", &["--remote", &shared]).0, "cached");
    assert_eq!(
        planned(&b, "count", &["--remote", &shared, "--verify", "full"]),
        (
            "remote".into(),
            vec![
                "corrupted (file count.txt: digest mismatch)".into(),
                format!("on remote {shared}")
            ]
        )
    );
    let (_, stderr) = b.ok(&[
        "run",
        "recipe.toml",
        "--remote",
        &shared,
        "--remote-cache",
        "read",
        "--verify",
        "full",
    ]);
    assert!(
        stderr.contains("the artifact of `count` is corrupted (file count.txt: digest mismatch)")
            && stderr.contains("ran 0 stages, 2 cached, 1 pulled"),
        "{stderr}"
    );
    assert_eq!(quarantined(&b), 2);
    b.ok(&["verify", "recipe.toml"]);
    // Without the remote, a corrupted artifact is built again, as before.
    damage(&b, "other", "other.txt");
    let (_, stderr) = b.ok(&["run", "recipe.toml"]);
    assert!(stderr.contains("ran 1 stage, 2 cached"), "{stderr}");
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().is_dir() {
            found.extend(files_under(&entry.path()));
        } else {
            found.push(entry.path());
        }
    }
    found
}

#[test]
fn gc_on_a_remote_keeps_what_a_lockfile_needs() {
    let a = commands_site("", None);
    let remote = a.scratch.path("shared");
    let remote_arg = remote.display().to_string();
    a.ok(&["run", "recipe.toml"]);
    a.ok(&["push", "recipe.toml", "--remote", &remote_arg]);
    std::fs::copy(a.scratch.path("recipe.lock"), a.scratch.path("before.lock")).unwrap();
    // A new version of `other`: the old one is referenced by before.lock only.
    a.scratch.write(
        "recipe.toml",
        &a.scratch.read("recipe.toml").replace("independent", "v2"),
    );
    a.ok(&["run", "recipe.toml"]);
    a.ok(&["push", "recipe.toml", "--remote", &remote_arg]);
    let artifacts = || std::fs::read_dir(remote.join("artifacts")).unwrap().count();
    assert_eq!(artifacts(), 4);
    // Without --yes nothing goes; within the grace period nothing goes either.
    let (stdout, stderr) = a.ok(&[
        "gc",
        "--remote",
        &remote_arg,
        "recipe.lock",
        "--grace",
        "0s",
    ]);
    assert!(
        stdout.contains("would remove") && stdout.contains("command other"),
        "{stdout}"
    );
    assert!(stderr.contains("pass --yes"), "{stderr}");
    let (_, stderr) = a.ok(&["gc", "--remote", &remote_arg, "recipe.lock", "--yes"]);
    assert!(stderr.contains("removed 0 artifacts"), "{stderr}");
    assert_eq!(artifacts(), 4);
    // Keeping both lockfiles keeps everything.
    a.ok(&[
        "gc",
        "--remote",
        &remote_arg,
        "recipe.lock",
        "before.lock",
        "--yes",
        "--grace",
        "0s",
    ]);
    assert_eq!(artifacts(), 4);
    let (stdout, _) = a.ok(&[
        "gc",
        "--remote",
        &remote_arg,
        "recipe.lock",
        "--yes",
        "--grace",
        "0s",
    ]);
    assert!(
        stdout.contains("removed") && stdout.contains("command other"),
        "{stdout}"
    );
    assert_eq!(artifacts(), 3);
    // What the current lockfile needs still pulls whole.
    let b = a.clone_checkout();
    b.ok(&["pull", "recipe.toml", "--remote", &remote_arg]);
    assert_eq!(b.artifact("other", "other.txt"), b"v2\n");
    assert_eq!(b.artifact("upper", "upper.txt"), b"ALPHA\nBETA\n");
    // And a lockfile is required.
    let out = a.rudder(&["gc", "--remote", &remote_arg]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_remote_that_is_down_is_a_warning_for_run_and_an_error_for_push_and_pull() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Nothing listens on `port` now.
    let mut a = commands_site(&s3_remote("down"), Some(port));
    a.env.push(("RUDDER_REMOTE_RETRIES".into(), "1".into()));
    let (_, stderr) = a.ok(&["run", "recipe.toml", "--remote", "team"]);
    assert!(
        stderr.contains("warning") && stderr.contains("planned without the remote"),
        "{stderr}"
    );
    assert!(stderr.contains("ran 3 stages"), "{stderr}");
    // A colleague's empty store, for a pull that has something to fetch.
    let b = a.clone_checkout();
    for (site, command) in [(&a, "push"), (&b, "pull")] {
        let out = site.rudder(&[command, "recipe.toml"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains("s3://down/rudder/rudder-remote.json"),
            "{command} names the object: {stderr}"
        );
    }
    // Nothing half-written locally.
    assert!(
        std::fs::read_dir(a.scratch.path(".rudder/tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn remotes_are_usage_errors_when_they_are_unknown_and_credentials_never_go_in_a_recipe() {
    let a = commands_site("[remotes.team]\nurl = \"/tmp/x\"\n", None);
    a.ok(&["run", "recipe.toml"]);
    let out = a.rudder(&["push", "recipe.toml", "--remote", "taem"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("did you mean `team`"),
        "{}",
        text(&out.stderr)
    );
    let out = a.rudder(&["push", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("none is the default"),
        "{}",
        text(&out.stderr)
    );
    let b = commands_site(
        "[remotes.team]\nurl = \"s3://bucket/p\"\nsecret_access_key = \"abc\"\n",
        None,
    );
    let out = b.rudder(&["validate", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("recipe.toml:7:1"), "{stderr}");
    assert!(stderr.contains("from the environment"), "{stderr}");
}
