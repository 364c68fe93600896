//! What a run is doing, for `rudder status` in another process: a [`Recorder`] wraps the run's
//! [`Observer`] and persists which stage started when and how far each one is; [`status`] reads
//! that back with the records of finished runs. It never changes what a run does: every write is
//! best-effort, and a failed one only leaves the status older.
//!
//! ```text
//! .rudder/runs/<started ms>-<pid>.live.json  the run going on: recipe, pid, its stages so far
//!                                            (removed when the run ends; left by a killed run)
//! .rudder/runs/<started ms>-<pid>.live.lock  held by the run's process while it goes on
//! .rudder/work/<key>/status.json             a stage's progress: position/length, message,
//!                                            rate and ETA (at most one write a second)
//! .rudder/runs/<started ms>-<pid>.json       a finished run's record (`executor.rs`)
//! ```
//!
//! A run is live while its process holds the lock beside its live record (writers share the
//! store's lock, so that one cannot tell runs apart; the operating system drops this one with the
//! process). A live record whose lock is free belongs to a run that was killed; the status file of
//! the stage it was in stays in that stage's work directory beside its checkpoints.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::EngineError;
use crate::executor::Observer;
use crate::integrity::Problem;
use crate::plan::PlanEntry;
use crate::runner::{Progress, StageOutcome};
use crate::store::Store;

/// Version of the live record and stage status formats.
pub const LIVE_FORMAT: u32 = 1;

/// The file in a stage's work directory that holds its progress.
pub const STATUS_FILE: &str = "status.json";

/// How often a stage's status file is rewritten at most.
const WRITE_EVERY: Duration = Duration::from_secs(1);

/// `runs/<ms>-<pid>.live.json`: a run while it goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveRun {
    pub format: u32,
    /// The recipe's absolute path.
    pub recipe: String,
    pub pid: u32,
    pub started: String,
    /// Stages the run's plan has to run.
    pub total: usize,
    /// Every stage started so far, in order.
    pub stages: Vec<LiveStage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveStage {
    pub name: String,
    pub kind: String,
    pub key: String,
    /// 1-based position in the run.
    pub position: usize,
    pub started: String,
    pub state: StageState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Running,
    Done,
    Failed,
}

/// `work/<key>/status.json`: how far a stage is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageProgress {
    pub format: u32,
    pub name: String,
    pub key: String,
    pub pid: u32,
    pub started: String,
    pub updated: String,
    /// Steps (or items) in all, once the stage knows.
    #[serde(default)]
    pub length: Option<u64>,
    pub position: u64,
    /// The stage's own line: `loss 0.6931, 2400 tokens/s` for a training stage.
    #[serde(default)]
    pub message: String,
    /// Positions per second since the first position this process reached (a resumed stage's
    /// earlier steps are not counted).
    #[serde(default)]
    pub per_second: Option<f64>,
    #[serde(default)]
    pub eta_seconds: Option<f64>,
}

/// The record `executor.rs` writes when a run ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub recipe: String,
    #[serde(default)]
    pub lockfile: String,
    pub started: String,
    #[serde(default)]
    pub ran: Vec<RanStage>,
    #[serde(default)]
    pub cached: usize,
    /// `success`, or the error that ended the run.
    pub outcome: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RanStage {
    pub name: String,
    #[serde(default)]
    pub key: Option<String>,
    pub seconds: f64,
}

/// Records a run for [`status`] while passing every call on to the observer it wraps.
pub struct Recorder<'a> {
    inner: &'a dyn Observer,
    path: PathBuf,
    /// Held while the run goes on (see the module's docs).
    _alive: Option<std::fs::File>,
    store: Store,
    run: Mutex<LiveRun>,
    /// Stages running now, by key, with the clock of each.
    running: Mutex<BTreeMap<String, (Arc<Tracker>, Instant)>>,
}

impl<'a> Recorder<'a> {
    /// Starts the live record of a run of `recipe_file` that will run `total` stages. Call
    /// [`Recorder::finish`] when the run has ended (its record is then the executor's).
    pub fn start(
        store: &Store,
        recipe_file: &Path,
        total: usize,
        inner: &'a dyn Observer,
    ) -> Result<Recorder<'a>, EngineError> {
        let started = SystemTime::now();
        let stamp = started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let pid = std::process::id();
        let runs = store.runs_dir();
        std::fs::create_dir_all(&runs)
            .map_err(|e| EngineError::io(format!("creating {}", runs.display()), e))?;
        let path = runs.join(format!("{stamp}-{pid}.live.json"));
        let alive = std::fs::File::create(path.with_extension("lock"))
            .ok()
            .filter(|file| file.try_lock().is_ok());
        let recorder = Recorder {
            inner,
            path,
            _alive: alive,
            store: store.clone(),
            run: Mutex::new(LiveRun {
                format: LIVE_FORMAT,
                recipe: absolute(recipe_file),
                pid,
                started: rfc3339(started),
                total,
                stages: Vec::new(),
            }),
            running: Mutex::new(BTreeMap::new()),
        };
        recorder.save();
        Ok(recorder)
    }

    /// The run has ended: its live record goes (the executor has written the run's record).
    pub fn finish(self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("lock"));
    }

    fn save(&self) {
        let run = self.run.lock().expect("live record lock");
        write_json(&self.path, &*run);
    }
}

impl Observer for Recorder<'_> {
    fn waiting_for_lock(&self, holder: Option<u32>) {
        self.inner.waiting_for_lock(holder);
    }

    fn waiting_for_key(&self, entry: &PlanEntry, holder: Option<&str>) {
        self.inner.waiting_for_key(entry, holder);
    }

    fn stage_queued(&self, entry: &PlanEntry, detail: &str) {
        self.inner.stage_queued(entry, detail);
    }

    fn quarantined(&self, node: &str, place: &Path, problems: &[Problem]) {
        self.inner.quarantined(node, place, problems);
    }

    fn stage_started(&self, entry: &PlanEntry, position: usize, total: usize) -> Box<dyn Progress> {
        let key = entry.key.to_hex();
        let now = SystemTime::now();
        {
            let mut run = self.run.lock().expect("live record lock");
            run.stages.push(LiveStage {
                name: entry.name.clone(),
                kind: entry.kind.clone(),
                key: key.clone(),
                position,
                started: rfc3339(now),
                state: StageState::Running,
                seconds: None,
                error: None,
            });
        }
        self.save();
        let tracker = Arc::new(Tracker {
            file: self.store.work_dir(&entry.key).join(STATUS_FILE),
            state: Mutex::new(TrackerState {
                progress: StageProgress {
                    format: LIVE_FORMAT,
                    name: entry.name.clone(),
                    key: key.clone(),
                    pid: std::process::id(),
                    started: rfc3339(now),
                    updated: rfc3339(now),
                    length: None,
                    position: 0,
                    message: String::new(),
                    per_second: None,
                    eta_seconds: None,
                },
                first: None,
                written: None,
            }),
        });
        self.running
            .lock()
            .expect("running stages lock")
            .insert(key, (tracker.clone(), Instant::now()));
        Box::new(LiveProgress {
            inner: self.inner.stage_started(entry, position, total),
            tracker,
        })
    }

    fn stage_finished(&self, entry: &PlanEntry, result: Result<&StageOutcome, &str>, seconds: f64) {
        let key = entry.key.to_hex();
        if let Some((tracker, _)) = self
            .running
            .lock()
            .expect("running stages lock")
            .remove(&key)
            && result.is_err()
        {
            // A failed stage keeps its work directory: leave where it stopped beside it.
            tracker.flush();
        }
        {
            let mut run = self.run.lock().expect("live record lock");
            if let Some(stage) = run.stages.iter_mut().rev().find(|s| s.key == key) {
                stage.state = match result {
                    Ok(_) => StageState::Done,
                    Err(_) => StageState::Failed,
                };
                stage.seconds = Some(seconds);
                stage.error = result.err().map(str::to_owned);
            }
        }
        self.save();
        self.inner.stage_finished(entry, result, seconds);
    }
}

/// One stage's progress, persisted at most once a second.
struct Tracker {
    file: PathBuf,
    state: Mutex<TrackerState>,
}

struct TrackerState {
    progress: StageProgress,
    /// When the first position was reached, and which.
    first: Option<(Instant, u64)>,
    written: Option<Instant>,
}

impl Tracker {
    fn update(&self, change: impl FnOnce(&mut TrackerState)) {
        let mut state = self.state.lock().expect("tracker lock");
        change(&mut state);
        let due = state.written.is_none_or(|t| t.elapsed() >= WRITE_EVERY);
        if due {
            self.write(&mut state);
        }
    }

    fn flush(&self) {
        let mut state = self.state.lock().expect("tracker lock");
        self.write(&mut state);
    }

    fn write(&self, state: &mut TrackerState) {
        let p = &mut state.progress;
        p.updated = rfc3339(SystemTime::now());
        if let Some((since, from)) = state.first {
            let seconds = since.elapsed().as_secs_f64();
            let done = p.position.saturating_sub(from);
            if seconds > 0.0 && done > 0 {
                let rate = done as f64 / seconds;
                p.per_second = Some(rate);
                p.eta_seconds = p
                    .length
                    .map(|length| length.saturating_sub(p.position) as f64 / rate);
            }
        }
        // The executor creates the work directory before the stage runs and removes it once
        // the artifact is committed: never bring it back.
        if self.file.parent().is_some_and(Path::is_dir) {
            write_json(&self.file, &state.progress);
        }
        state.written = Some(Instant::now());
    }
}

/// The Progress handed to a stage: the observer's, with every change recorded.
struct LiveProgress {
    inner: Box<dyn Progress>,
    tracker: Arc<Tracker>,
}

impl Progress for LiveProgress {
    fn set_length(&self, length: u64) {
        self.inner.set_length(length);
        self.tracker.update(|s| s.progress.length = Some(length));
    }
    fn set_position(&self, position: u64) {
        self.inner.set_position(position);
        self.tracker.update(|s| {
            s.progress.position = position;
            if s.first.is_none() {
                s.first = Some((Instant::now(), position));
            }
        });
    }
    fn set_message(&self, message: String) {
        self.tracker
            .update(|s| s.progress.message.clone_from(&message));
        self.inner.set_message(message);
    }
    fn println(&self, line: &str) {
        self.inner.println(line);
    }
}

/// What `rudder status` shows for one recipe.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The newest run of the recipe that has no final record: going on, or killed.
    pub live: Option<LiveStatus>,
    /// The newest finished run of the recipe.
    pub last: Option<RunRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LiveStatus {
    #[serde(flatten)]
    pub run: LiveRun,
    /// Whether its process still holds the store's lock (false: it was killed).
    pub alive: bool,
    /// Progress of the stages not done, by name.
    pub progress: BTreeMap<String, StageProgress>,
    /// Where each running stage is writing its artifact, by name.
    pub pending: BTreeMap<String, PathBuf>,
    /// The latest `metrics.jsonl` line of each running stage, by name.
    pub metrics: BTreeMap<String, Value>,
}

/// The status of the runs of `recipe_file` on `store`.
pub fn status(store: &Store, recipe_file: &Path) -> Result<Status, EngineError> {
    let recipe = absolute(recipe_file);
    let same_recipe = |path: &str| same_file(path, &recipe);
    let mut live: Option<(u128, LiveRun)> = None;
    let mut last: Option<(u128, RunRecord)> = None;
    let dir = store.runs_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Status {
                live: None,
                last: None,
            });
        }
        Err(e) => return Err(EngineError::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stamp) = name.split('-').next().and_then(|s| s.parse::<u128>().ok()) else {
            continue;
        };
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        if name.ends_with(".live.json") {
            if let Ok(run) = serde_json::from_slice::<LiveRun>(&bytes)
                && same_recipe(&run.recipe)
                && live.as_ref().is_none_or(|(s, _)| stamp > *s)
            {
                live = Some((stamp, run));
            }
        } else if name.ends_with(".json")
            && let Ok(record) = serde_json::from_slice::<RunRecord>(&bytes)
            && same_recipe(&record.recipe)
            && last.as_ref().is_none_or(|(s, _)| stamp > *s)
        {
            last = Some((stamp, record));
        }
    }
    let live = live.and_then(|(stamp, run)| {
        let alive = is_alive(store, stamp, run.pid);
        // A killed run older than the last finished one is history.
        if !alive && last.as_ref().is_some_and(|(s, _)| *s > stamp) {
            return None;
        }
        Some(live_status(store, run, alive))
    });
    Ok(Status {
        live,
        last: last.map(|(_, record)| record),
    })
}

/// Whether the run recorded as `<stamp>-<pid>` still goes on: its process holds its lock.
fn is_alive(store: &Store, stamp: u128, pid: u32) -> bool {
    let path = store.runs_dir().join(format!("{stamp}-{pid}.live.lock"));
    match std::fs::File::open(&path) {
        Ok(file) => match file.try_lock_shared() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(_)) => false,
        },
        Err(_) => false,
    }
}

fn live_status(store: &Store, run: LiveRun, alive: bool) -> LiveStatus {
    let mut progress = BTreeMap::new();
    let mut pending = BTreeMap::new();
    let mut metrics = BTreeMap::new();
    for stage in run.stages.iter().filter(|s| s.state != StageState::Done) {
        let Some(key) = crate::Key::from_hex(&stage.key) else {
            continue;
        };
        let file = store.work_dir(&key).join(STATUS_FILE);
        if let Some(p) = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<StageProgress>(&b).ok())
        {
            progress.insert(stage.name.clone(), p);
        }
        if alive
            && stage.state == StageState::Running
            && let Some(dir) = store.pending_dirs(&key).into_iter().next()
        {
            if let Some(line) = last_line(&dir.join("metrics.jsonl")) {
                metrics.insert(stage.name.clone(), line);
            }
            pending.insert(stage.name.clone(), dir);
        }
    }
    LiveStatus {
        run,
        alive,
        progress,
        pending,
        metrics,
    }
}

/// The last complete JSON line of a file being appended to.
fn last_line(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find_map(|line| serde_json::from_str::<Value>(line).ok())
}

/// Writes a status file in one rename. No fsync: a status is worth less than the time.
fn write_json<T: Serialize>(path: &Path, value: &T) {
    let Some(dir) = path.parent() else { return };
    let result = tempfile::NamedTempFile::new_in(dir).and_then(|mut tmp| {
        tmp.write_all(&serde_json::to_vec_pretty(value).expect("status serialises"))?;
        tmp.persist(path).map(|_| ()).map_err(|e| e.error)
    });
    if let Err(e) = result {
        tracing::debug!("could not write {}: {e}", path.display());
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// Whether two recorded paths name one file (records may spell one path two ways).
fn same_file(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Seconds since an RFC 3339 time (0 if it is unreadable or in the future).
pub fn seconds_since(time: &str) -> f64 {
    humantime::parse_rfc3339(time)
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyBuilder;
    use crate::plan::State;
    use crate::runner::NoProgress;

    struct Quiet;

    impl Observer for Quiet {
        fn waiting_for_lock(&self, _: Option<u32>) {}
        fn stage_started(&self, _: &PlanEntry, _: usize, _: usize) -> Box<dyn Progress> {
            Box::new(NoProgress)
        }
        fn stage_finished(&self, _: &PlanEntry, _: Result<&StageOutcome, &str>, _: f64) {}
    }

    fn entry(name: &str) -> PlanEntry {
        PlanEntry {
            index: petgraph::graph::NodeIndex::new(0),
            name: name.into(),
            kind: "sft".into(),
            key: KeyBuilder::new("test").str(name).finish(),
            state: State::Run,
            reasons: Vec::new(),
            is_source: false,
        }
    }

    #[test]
    fn a_running_stage_is_seen_from_outside_and_a_dead_run_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.toml");
        std::fs::write(&recipe, "").unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        store.init().unwrap();
        let lock = store.lock(|_| panic!("free")).unwrap();
        let recorder = Recorder::start(&store, &recipe, 2, &Quiet).unwrap();

        let first = entry("tokenizer");
        let progress = recorder.stage_started(&first, 1, 2);
        drop(progress);
        recorder.stage_finished(&first, Ok(&StageOutcome::default()), 0.5);

        let sft = entry("sft");
        std::fs::create_dir_all(store.work_dir(&sft.key)).unwrap();
        let pending = store.begin(&sft.key).unwrap();
        std::fs::write(
            pending.dir.join("metrics.jsonl"),
            "{\"step\":10,\"loss\":0.5}\n{\"step\":20,\"loss\":0.25}\n{\"step\":3",
        )
        .unwrap();
        let progress = recorder.stage_started(&sft, 2, 2);
        progress.set_length(100);
        std::thread::sleep(WRITE_EVERY);
        progress.set_position(40);
        progress.set_message("loss 0.2500".into());
        std::thread::sleep(WRITE_EVERY);
        progress.set_position(50);

        let seen = status(&store, &recipe).unwrap();
        let live = seen.live.expect("a live run");
        assert!(live.alive, "this process holds the lock");
        assert_eq!(live.run.total, 2);
        let states: Vec<_> = live
            .run
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.state))
            .collect();
        assert_eq!(
            states,
            [
                ("tokenizer", StageState::Done),
                ("sft", StageState::Running)
            ]
        );
        let p = &live.progress["sft"];
        assert_eq!((p.length, p.position), (Some(100), 50));
        assert_eq!(p.message, "loss 0.2500");
        // 10 positions in a second (or more, on a busy machine), 50 to go.
        let eta = p.eta_seconds.expect("an ETA");
        assert!(eta > 1.0 && eta <= 50.0, "{eta}");
        assert_eq!(live.pending["sft"], pending.dir);
        // The torn last line of a file being written is skipped.
        assert_eq!(live.metrics["sft"]["loss"], 0.25);
        assert!(seen.last.is_none());

        // The process dies (its lock goes with it): the record stays, seen as dead.
        drop(progress);
        drop(recorder);
        drop(lock);
        let seen = status(&store, &recipe).unwrap();
        assert!(!seen.live.expect("the record stays").alive);

        // A finished run's record is newer: the killed run is history.
        std::thread::sleep(Duration::from_millis(5));
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        std::fs::write(
            store.runs_dir().join(format!("{stamp}-1.json")),
            serde_json::json!({
                "recipe": recipe.display().to_string(), "started": "2026-01-01T00:00:00Z",
                "ran": [{"name": "sft", "key": sft.key.to_hex(), "seconds": 2.0}],
                "cached": 1, "outcome": "success"
            })
            .to_string(),
        )
        .unwrap();
        let seen = status(&store, &recipe).unwrap();
        assert!(seen.live.is_none());
        assert_eq!(seen.last.unwrap().ran[0].name, "sft");

        // Another recipe's runs are not this one's.
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "").unwrap();
        let seen = status(&store, &other).unwrap();
        assert!(seen.live.is_none() && seen.last.is_none());

        // A run that ends removes its own live record (the killed run's stays).
        let live_records = || {
            std::fs::read_dir(store.runs_dir())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".live.json"))
                .count()
        };
        let again = Recorder::start(&store, &recipe, 1, &Quiet).unwrap();
        assert_eq!(live_records(), 2);
        again.finish();
        assert_eq!(live_records(), 1);
    }

    #[test]
    fn a_failed_stage_leaves_where_it_stopped_in_its_work_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        store.init().unwrap();
        let recorder = Recorder::start(&store, &dir.path().join("r.toml"), 1, &Quiet).unwrap();
        let sft = entry("sft");
        std::fs::create_dir_all(store.work_dir(&sft.key)).unwrap();
        let progress = recorder.stage_started(&sft, 1, 1);
        progress.set_length(10);
        // Within the second: not written yet, but flushed when the stage fails.
        progress.set_position(7);
        recorder.stage_finished(&sft, Err("boom"), 1.0);
        let saved: StageProgress = serde_json::from_slice(
            &std::fs::read(store.work_dir(&sft.key).join(STATUS_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(saved.position, 7);
        let run: LiveRun = serde_json::from_slice(&std::fs::read(&recorder.path).unwrap()).unwrap();
        assert_eq!(run.stages[0].state, StageState::Failed);
        assert_eq!(run.stages[0].error.as_deref(), Some("boom"));
    }
}
