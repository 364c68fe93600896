//! Engine benchmarks through the real binary: `plan` and a no-op `run` of a generated recipe of
//! 50 command stages, and BLAKE3 hashing throughput of a 1 GiB file (cold and from the digest
//! cache). Run with `cargo bench --bench engine`; prints a table, asserts nothing.

use std::process::Command;
use std::time::{Duration, Instant};

fn rudder(dir: &std::path::Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("rudder runs");
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

/// Median of `runs` timings.
fn median(mut f: impl FnMut() -> Duration, runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    times[runs / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut recipe =
        String::from("[recipe]\nname = \"bench\"\n\n[datasets.raw]\npath = \"raw.txt\"\n");
    for i in 0..50 {
        // A chain of ten, five times over, each reading the previous stage's output.
        let input = if i % 10 == 0 {
            "raw".to_owned()
        } else {
            format!("s{}.out", i - 1)
        };
        recipe.push_str(&format!(
            "\n[stages.s{i}]\nkind = \"command\"\ninputs = [\"{input}\"]\ncmd = \"cat {{{{ inputs['{input}'] }}}} > {{{{ out }}}}/out.txt\"\noutputs = {{ out = \"out.txt\" }}\n"
        ));
    }
    std::fs::write(dir.path().join("bench.toml"), recipe).unwrap();
    std::fs::write(dir.path().join("raw.txt"), "data\n").unwrap();
    let first = rudder(dir.path(), &["run", "bench.toml", "--quiet"]);
    let plan = median(
        || rudder(dir.path(), &["plan", "bench.toml", "--quiet"]),
        11,
    );
    let noop = median(|| rudder(dir.path(), &["run", "bench.toml", "--quiet"]), 11);
    println!("| benchmark | time |");
    println!("| --- | --- |");
    println!(
        "| first run, 50 command stages | {:.0} ms |",
        first.as_secs_f64() * 1e3
    );
    println!(
        "| plan, 50 stages (median of 11) | {:.1} ms |",
        plan.as_secs_f64() * 1e3
    );
    println!(
        "| no-op run, 50 stages (median of 11) | {:.1} ms |",
        noop.as_secs_f64() * 1e3
    );

    let big = dir.path().join("big.bin");
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let block: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        for _ in 0..1024 {
            file.write_all(&block).unwrap();
        }
    }
    let bytes = std::fs::metadata(&big).unwrap().len() as f64;
    let hash = median(
        || {
            let start = Instant::now();
            rudder_engine::digest::hash_file(&big).unwrap();
            start.elapsed()
        },
        3,
    );
    println!(
        "| BLAKE3 of a 1 GiB file (median of 3) | {:.2} GB/s |",
        bytes / hash.as_secs_f64() / 1e9
    );
    let cache = rudder_engine::digest::DigestCache::in_memory();
    cache.file(&big).unwrap();
    let cached = median(
        || {
            let start = Instant::now();
            cache.file(&big).unwrap();
            start.elapsed()
        },
        11,
    );
    println!(
        "| same file, size+mtime digest cache hit | {:.3} ms |",
        cached.as_secs_f64() * 1e3
    );
}
