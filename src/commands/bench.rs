//! `rudder bench KIND --model M`: times KIND's training step (the objective its stage runs) on a
//! model and this machine, and prints tokens/s, the step time, peak memory and the parameters.

use rudder_stages::bench::{BenchError, BenchModel, BenchOptions};

use crate::ExitStatus;
use crate::cli::BenchArgs;
use crate::printer::Printer;

pub fn run(args: &BenchArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let usage = |m: String| anyhow::Error::from(rudder_engine::EngineError::Usage(m));
    let model = BenchModel::parse(&args.model).map_err(usage)?;
    let backend = super::backend(Some(&args.backend))?.expect("a backend was named");
    let opts = BenchOptions {
        kind: args.kind.clone(),
        model,
        batch: args.batch,
        seq: args.seq,
        new_tokens: args.new_tokens,
        steps: args.steps,
        backend,
        precision: super::precision(Some(&args.precision))?.expect("a precision was named"),
    };
    if !args.json {
        printer.status(format!(
            "timing {} steps of `{}` ({} x {} tokens) on {} in {} ...",
            args.steps + rudder_stages::bench::WARMUP_STEPS,
            args.kind,
            args.batch,
            args.seq,
            args.backend,
            args.precision
        ));
    }
    let report = match rudder_stages::bench::run(&opts) {
        Ok(report) => report,
        Err(BenchError::Usage(m)) => return Err(usage(m)),
        Err(e) => return Err(e.into()),
    };
    if args.json {
        printer.data(serde_json::to_string_pretty(&report)?);
    } else {
        printer.data(format!(
            "{}: {:.0} tokens/s, {:.3} s/step, first step {:+.3} s (compile and autotune on GPU backends), peak {:.0} MiB, {} parameters ({}, {})",
            report.kind,
            report.tokens_per_second,
            report.step_seconds,
            report.warmup_seconds,
            report.peak_rss_mib,
            report.params,
            report.backend,
            report.precision
        ));
    }
    Ok(ExitStatus::Success)
}
