//! `hearth bench all --quick --json` as a smoke check: every scenario runs against a stack of real
//! processes and reports its numbers with the same-run baseline. Timings are never asserted here
//! (they live in docs/BENCHMARKS.md); only that each scenario measured something.

use std::process::Command;

use hearth_testkit::workspace_bin;

#[test]
fn every_bench_scenario_runs_and_reports_against_its_baseline() {
    let out = Command::new(workspace_bin("hearth").unwrap())
        .args(["bench", "all", "--quick", "--json", "--concurrency", "8"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let names: Vec<&str> = reports
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "claims",
            "exec",
            "cold",
            "refill",
            "memory",
            "tenants",
            "processes",
            "scale"
        ]
    );
    let positive = |r: &serde_json::Value, key: &str| {
        let v = r[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {r}"));
        assert!(v > 0.0, "{key} = {v} in {r}");
    };
    for key in [
        "baseline_rtt_p50_ms",
        "claim_p50_ms",
        "claim_p99_ms",
        "claim_p50_to_baseline",
        "throughput_claims_per_s",
    ] {
        positive(&reports[0], key);
    }
    assert_eq!(reports[0]["cold_in_sequential"], 0, "the pool ran dry");
    for key in [
        "exec_p50_ms",
        "exec_p50_to_baseline",
        "throughput_execs_per_s",
    ] {
        positive(&reports[1], key);
    }
    for key in ["cold_claim_p50_ms", "warm_claim_p50_ms", "cold_to_warm_p50"] {
        positive(&reports[2], key);
    }
    assert_eq!(reports[2]["cold_claims_served_cold"], 10);
    positive(&reports[3], "restores_per_s_per_worker");
    positive(&reports[4], "scheduler_rss_after_mib");
    for key in [
        "operator_claim_p50_ms",
        "tenant_claim_p50_ms",
        "tenant_to_operator_p50",
        "tenant_claim_under_flood_p99_ms",
        "flood_refused",
    ] {
        positive(&reports[5], key);
    }
    for key in [
        "exec_echo_p50_ms",
        "process_first_byte_p50_ms",
        "reattach_first_byte_p50_ms",
        "first_byte_p50_to_exec",
    ] {
        positive(&reports[6], key);
    }
    for key in [
        "claim_p50_ms",
        "claim_p99_ms",
        "claim_p50_to_baseline",
        "throughput_claims_per_s",
        "heartbeat_bytes_per_s",
        "reconcile_pass_mean_ms",
        "scheduler_rss_mib",
    ] {
        positive(&reports[7], key);
    }
}
