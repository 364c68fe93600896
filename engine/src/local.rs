//! The local executor: jobs run on threads of this process, as many at once as `jobs` allows,
//! each as soon as the jobs it needs have succeeded, in plan order among those ready.
//!
//! ```text
//!   split ─► tokenizer ─► pretrain ─► sft ─┬─► sigmoid ─┐
//!                                          ├─► ipo ─────┼─► eval     -j 3: sigmoid, ipo and
//!                                          └─► hinge ───┘            hinge run at once
//! ```
//!
//! Limits: at most `jobs` stages at once, and at most `gpus` of them on a GPU backend (every
//! stage uses the first device, so one at a time). Each stage is given `threads` = the cores
//! divided by the stages that can run at once, so that concurrent training stages do not
//! oversubscribe the machine. The default `jobs` is one stage per [`CORES_PER_STAGE`] cores:
//! rudder does not know a stage's memory before it runs, so memory is not counted; set
//! `jobs` (`-j`, or `jobs` in `[recipe]`) when the stages are memory-bound.
//!
//! A failure stops starting new stages; stages already running are let finish (their work is
//! kept, committed and cached), since cancelling a long training stage throws its progress
//! away. With `keep_going`, every stage that needs no failed one still runs.

use std::sync::atomic::Ordering;
use std::sync::mpsc;

use rudder_schema::Backend;

use crate::error::EngineError;
use crate::executor::{Executor, Job, JobEnd, Run};

/// Cores per concurrently running stage in the default `jobs`: small models do not train
/// faster on many more threads than this, so several stages at once use a large machine better.
pub const CORES_PER_STAGE: usize = 4;

#[derive(Debug, Clone)]
pub struct LocalExecutor {
    /// Most stages at once.
    pub jobs: usize,
    /// Most stages on a GPU backend at once.
    pub gpus: usize,
    /// Cores to share among running stages.
    pub cores: usize,
}

impl LocalExecutor {
    /// `jobs` stages at once (the default rule when `None`) on this machine's cores.
    pub fn new(jobs: Option<usize>) -> Self {
        let cores = available_cores();
        LocalExecutor {
            jobs: jobs.unwrap_or_else(|| default_jobs(cores)).max(1),
            gpus: 1,
            cores,
        }
    }

    /// Threads for each stage of a run of `job_count` jobs: the cores shared by as many stages
    /// as can run at once, at least one.
    pub fn threads(&self, job_count: usize) -> usize {
        (self.cores / self.jobs.min(job_count).max(1)).max(1)
    }
}

/// One stage per [`CORES_PER_STAGE`] cores, at least one.
pub fn default_jobs(cores: usize) -> usize {
    (cores / CORES_PER_STAGE).max(1)
}

/// The cores this process may use (its CPU affinity and cgroup quota included).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn on_gpu(backend: Backend) -> bool {
    matches!(backend, Backend::Cuda | Backend::Wgpu)
}

#[derive(Debug)]
enum Slot {
    Waiting,
    Running,
    Done(JobEnd),
}

impl Executor for LocalExecutor {
    fn execute(&self, run: &Run<'_>, jobs: &[Job<'_>]) -> Vec<JobEnd> {
        let threads = self.threads(jobs.len());
        let gpu: Vec<bool> = jobs
            .iter()
            .map(|job| on_gpu(run.plan.keyed[&job.entry.index].backend))
            .collect();
        let mut slots: Vec<Slot> = jobs.iter().map(|_| Slot::Waiting).collect();
        let mut stopped = false;
        std::thread::scope(|scope| {
            let (done_tx, done_rx) = mpsc::channel::<(usize, JobEnd)>();
            let mut running = 0usize;
            let mut gpus_running = 0usize;
            loop {
                stopped |= run.interrupted.load(Ordering::Relaxed);
                if !stopped {
                    // Jobs that need a failed or never-run job will never run.
                    for i in 0..jobs.len() {
                        if matches!(slots[i], Slot::Waiting)
                            && jobs[i].needs.iter().any(|&n| {
                                matches!(slots[n], Slot::Done(JobEnd::Failed(_) | JobEnd::NotRun))
                            })
                        {
                            slots[i] = Slot::Done(JobEnd::NotRun);
                        }
                    }
                    for i in 0..jobs.len() {
                        if running >= self.jobs {
                            break;
                        }
                        let ready = matches!(slots[i], Slot::Waiting)
                            && jobs[i].needs.iter().all(|&n| {
                                matches!(slots[n], Slot::Done(JobEnd::Built { .. } | JobEnd::Found))
                            });
                        if !ready || (gpu[i] && gpus_running >= self.gpus) {
                            continue;
                        }
                        slots[i] = Slot::Running;
                        running += 1;
                        gpus_running += usize::from(gpu[i]);
                        let done = done_tx.clone();
                        let job = &jobs[i];
                        let total = jobs.len();
                        std::thread::Builder::new()
                            .name(format!("stage {}", job.entry.name))
                            .spawn_scoped(scope, move || {
                                // Every started job must report, or the loop would wait for it
                                // forever (`build` catches a stage's panic; this, the rest).
                                let end =
                                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                        run.build(job, total, threads)
                                    }))
                                    .unwrap_or_else(|_| {
                                        JobEnd::Failed(EngineError::StageFailed {
                                            node: job.entry.name.clone(),
                                            kind: job.entry.kind.clone(),
                                            message: "panicked".into(),
                                        })
                                    });
                                let _ = done.send((i, end));
                            })
                            .expect("the system can start a thread");
                    }
                }
                if running == 0 {
                    break;
                }
                let (i, end) = done_rx.recv().expect("a running stage reports its end");
                running -= 1;
                gpus_running -= usize::from(gpu[i]);
                if matches!(end, JobEnd::Failed(_)) && !run.keep_going {
                    stopped = true;
                }
                slots[i] = Slot::Done(end);
            }
        });
        slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Done(end) => end,
                Slot::Waiting | Slot::Running => JobEnd::NotRun,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_leaves_each_stage_a_few_cores() {
        assert_eq!(default_jobs(1), 1);
        assert_eq!(default_jobs(2), 1);
        assert_eq!(default_jobs(8), 2);
        assert_eq!(default_jobs(64), 16);
    }

    #[test]
    fn threads_share_the_cores_among_stages_that_run_at_once() {
        let local = LocalExecutor {
            jobs: 3,
            gpus: 1,
            cores: 16,
        };
        assert_eq!(local.threads(10), 5);
        // A run of one stage gives it every core.
        assert_eq!(local.threads(1), 16);
        let small = LocalExecutor {
            jobs: 3,
            gpus: 1,
            cores: 2,
        };
        assert_eq!(small.threads(3), 1);
    }
}
