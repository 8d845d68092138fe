//! Simulate checkpoint rounds of the stasis protocol at scale and print a
//! markdown table: time to commit, abort rates under failure models,
//! messages per round.
//!
//! `cargo run --release -p stasis-proto --bin stasis-sim -- --agents 1000,10000 --rounds 200`

use stasis_proto::sim::{quantile, run, SimConfig, SimReport};
use std::process::ExitCode;

const USAGE: &str =
    "usage: stasis-sim [--agents N,N..] [--rounds N] [--crash P,P..] [--save-fail P,P..] [--loss P,P..] [--seed N]
  --agents     simulated hosts (default 1000,10000)
  --rounds     checkpoint rounds per row (default 200)
  --crash      per-host probability of a silent crash during a round (default 0,1e-4,1e-3)
  --save-fail  per-host probability that its save fails (default 1e-4,1e-3)
  --loss       per-message probability that a TCP connection breaks (default 1e-5)
  --seed       RNG seed (default 1)";

fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>, String> {
    s.split(',').map(|x| x.trim().parse().map_err(|_| format!("bad value {x:?}"))).collect()
}

fn ms(ns: Option<u64>) -> String {
    ns.map(|n| format!("{:.0}", n as f64 / 1e6)).unwrap_or_else(|| "-".into())
}

fn row(model: &str, p: f64, r: &SimReport) -> String {
    format!(
        "| {} | {} | {:e} | {} | {:.1} % | {}/{}/{} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |",
        r.agents,
        model,
        p,
        r.rounds,
        r.abort_rate() * 100.0,
        r.aborted_deadline,
        r.aborted_save_failed,
        r.aborted_lost,
        ms(quantile(&r.commit_ns, 0.5)),
        ms(quantile(&r.commit_ns, 0.99)),
        ms(quantile(&r.round_ns, 0.5)),
        ms(quantile(&r.round_ns, 0.99)),
        ms(quantile(&r.d_ns, 0.5)),
        ms(Some(r.max_saved_after_freeze_ns)),
        r.messages as f64 / r.rounds.max(1) as f64,
        r.late_prepares + r.late_resumes,
        r.orphan_resumes,
    )
}

fn main() -> ExitCode {
    let mut agents = vec![1_000usize, 10_000];
    let mut rounds = 200usize;
    let mut crash = vec![0.0, 1e-4, 1e-3];
    let mut save_fail = vec![1e-4, 1e-3];
    let mut loss = vec![1e-5];
    let mut seed = 1u64;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--agents" => agents = list(&val()?)?,
                "--rounds" => rounds = val()?.parse().map_err(|_| "bad --rounds".to_string())?,
                "--crash" => crash = list(&val()?)?,
                "--save-fail" => save_fail = list(&val()?)?,
                "--loss" => loss = list(&val()?)?,
                "--seed" => seed = val()?.parse().map_err(|_| "bad --seed".to_string())?,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other}")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("stasis-sim: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let base = SimConfig::default();
    println!(
        "latency lognormal median {:.0} us p99 {:.0} us; stop median {:.1} ms p99 {:.1} ms; save median {:.0} ms p99 {:.0} ms; clock error sd {:.0} us;",
        base.latency.median_ns / 1e3,
        base.latency.p99_ns / 1e3,
        base.stop.median_ns / 1e6,
        base.stop.p99_ns / 1e6,
        base.save.median_ns / 1e6,
        base.save.p99_ns / 1e6,
        base.clock_err_ns / 1e3
    );
    println!(
        "coordinator {} us per message, manifest {} ms; margin {} ms, save budget {} ms, resume margin {} ms; broken connections noticed after {} ms; seed {seed}\n",
        base.coord_msg_ns / 1_000,
        base.manifest_ns / 1_000_000,
        base.coord.margin_ns / 1_000_000,
        base.coord.save_budget_ns / 1_000_000,
        base.coord.resume_margin_ns / 1_000_000,
        base.detect_ns / 1_000_000
    );
    println!("| agents | failure model | p | rounds | abort rate | aborts deadline/failed/lost | commit p50 ms | commit p99 ms | round p50 ms | round p99 ms | D p50 ms | latest Saved after T ms | msgs/round | late prepare+resume | orphan resumes |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &agents {
        let cfg = SimConfig { agents: n, rounds, seed, ..SimConfig::default() };
        for &p in &crash {
            println!("{}", row("host crash", p, &run(&SimConfig { crash_p: p, ..cfg.clone() })));
        }
        for &p in &save_fail {
            println!("{}", row("save fails", p, &run(&SimConfig { save_fail_p: p, ..cfg.clone() })));
        }
        for &p in &loss {
            println!("{}", row("conn. loss/msg", p, &run(&SimConfig { loss_p: p, ..cfg.clone() })));
        }
    }
    println!("\ncommit = start → manifest durable (includes the freeze margin and the slowest save); round = start → every Resumed in (or the resume timeout).");
    ExitCode::SUCCESS
}
