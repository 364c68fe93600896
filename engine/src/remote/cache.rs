//! A remote as `rudder run`'s cache: the plan asks it for what the store lacks or holds
//! corrupted ([`RemoteIndex`]), the run fetches that before it starts ([`Remote::pull`],
//! which moves the corrupted ones to quarantine), and with
//! `read-write` every stage this run builds is pushed as soon as it is committed, on a thread
//! of its own while the next stages run ([`PushAfterBuild`]). The remote never stops a run:
//! when it is unreachable, its errors are warnings and the stages are built here.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{PushReport, Remote, Wanted};
use crate::executor::Observer;
use crate::key::Key;
use crate::plan::{PlanEntry, RemoteIndex};
use crate::runner::{NoProgress, Progress, StageOutcome};
use crate::store::Store;

/// A remote with the name plans give it.
pub struct RemoteCache {
    pub remote: Arc<Remote>,
    name: String,
}

impl RemoteCache {
    pub fn new(remote: Arc<Remote>) -> Self {
        let name = remote
            .target()
            .name
            .clone()
            .unwrap_or_else(|| remote.target().url().to_owned());
        RemoteCache { remote, name }
    }
}

impl RemoteIndex for RemoteCache {
    fn name(&self) -> &str {
        &self.name
    }

    fn holds(&self, keys: &[Key]) -> Result<BTreeSet<Key>, String> {
        self.remote.has(keys).map_err(|e| e.to_string())
    }
}

/// The artifacts a plan fetches from the remote.
pub fn to_fetch(plan: &crate::plan::Plan) -> Vec<Wanted> {
    plan.to_fetch()
        .into_iter()
        .map(|entry| Wanted {
            name: entry.name.clone(),
            key: entry.key,
            outputs: Default::default(),
        })
        .collect()
}

/// What the pushes of a run did, and their errors (each a warning).
type Pushed = (PushReport, Vec<String>);

/// Pushes keys one after another on a thread of its own.
pub struct Uploader {
    queue: Mutex<Option<mpsc::Sender<Wanted>>>,
    worker: Mutex<Option<JoinHandle<Pushed>>>,
}

impl Uploader {
    pub fn start(remote: Arc<Remote>, store: Store) -> Uploader {
        let (tx, rx) = mpsc::channel::<Wanted>();
        let worker = std::thread::Builder::new()
            .name("rudder-push".into())
            .spawn(move || {
                let mut total = PushReport::default();
                let mut errors = Vec::new();
                for wanted in rx {
                    match remote.push(&store, std::slice::from_ref(&wanted), &NoProgress) {
                        Ok(report) => {
                            total.pushed.extend(report.pushed);
                            total.present.extend(report.present);
                            total.raced.extend(report.raced);
                            total.files += report.files;
                            total.bytes += report.bytes;
                            total.reused += report.reused;
                        }
                        Err(err) => errors.push(format!("{}: {err}", wanted.name)),
                    }
                }
                (total, errors)
            })
            .expect("the system can start a thread");
        Uploader {
            queue: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        }
    }

    pub fn push(&self, name: &str, key: Key) {
        if let Some(queue) = self.queue.lock().expect("uploader lock").as_ref() {
            let _ = queue.send(Wanted {
                name: name.to_owned(),
                key,
                outputs: Default::default(),
            });
        }
    }

    /// Waits for every queued push: what was pushed, and the errors (each a warning).
    pub fn finish(&self) -> Pushed {
        self.queue.lock().expect("uploader lock").take();
        match self.worker.lock().expect("uploader lock").take() {
            Some(worker) => worker.join().unwrap_or_else(|_| {
                (
                    PushReport::default(),
                    vec!["the push thread panicked".into()],
                )
            }),
            None => (PushReport::default(), Vec::new()),
        }
    }
}

/// An [`Observer`] that hands every stage the run built to an [`Uploader`] (a stage's end is
/// reported after its artifact is committed, for local and Slurm jobs alike).
pub struct PushAfterBuild<'a> {
    pub inner: &'a dyn Observer,
    pub uploader: &'a Uploader,
}

impl Observer for PushAfterBuild<'_> {
    fn waiting_for_lock(&self, holder: Option<u32>) {
        self.inner.waiting_for_lock(holder);
    }

    fn waiting_for_key(&self, entry: &PlanEntry, holder: Option<&str>) {
        self.inner.waiting_for_key(entry, holder);
    }

    fn stage_queued(&self, entry: &PlanEntry, detail: &str) {
        self.inner.stage_queued(entry, detail);
    }

    fn stage_started(&self, entry: &PlanEntry, position: usize, total: usize) -> Box<dyn Progress> {
        self.inner.stage_started(entry, position, total)
    }

    fn stage_finished(&self, entry: &PlanEntry, result: Result<&StageOutcome, &str>, seconds: f64) {
        self.inner.stage_finished(entry, result, seconds);
        if result.is_ok() {
            self.uploader.push(&entry.name, entry.key);
        }
    }
}
