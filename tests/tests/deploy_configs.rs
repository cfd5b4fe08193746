//! The deploy/ files are valid for the tools that read them: Prometheus rules and config
//! (`promtool check` and `promtool test rules`), the compose files (`docker-compose config`), the
//! Grafana dashboard and provisioning, and the Dockerfile's binaries. Tools this machine lacks are
//! skipped with a printed reason (`scripts/setup.sh` installs them from Debian when it can).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use hearth_testkit::workspace_root;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

fn deploy(path: &str) -> PathBuf {
    workspace_root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(path: &str) -> Yaml {
    let path = deploy(path);
    serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(path: &str) -> Json {
    let path = deploy(path);
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Finds a tool on PATH or where scripts/setup.sh unpacks it (.tools/prometheus/usr/bin), or
/// prints why the test is skipped.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    dirs.push(workspace_root().join(".tools/prometheus/usr/bin"));
    let found = dirs
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "SKIPPED: `{name}` is not installed (Debian package `{package}`; scripts/setup.sh \
             installs it when apt-get works)"
        );
    }
    found
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

fn str_at<'a>(value: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for key in path {
        v = v.get(*key)?;
    }
    v.as_str()
}

#[test]
fn promtool_accepts_the_rules_the_configs_and_the_rule_unit_tests() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let dir = deploy("prometheus");
    let out =
        run_ok(
            Command::new(&promtool)
                .current_dir(&dir)
                .args(["check", "rules", "alerts.yml"]),
        );
    assert!(out.contains("SUCCESS"), "{out}");
    for config in ["prometheus.yml", "prometheus-cluster.yml"] {
        let out = run_ok(
            Command::new(&promtool)
                .current_dir(&dir)
                .args(["check", "config", config]),
        );
        assert!(out.contains("SUCCESS"), "{out}");
    }
    // The alerts fire (and stay quiet) on the series in alerts_test.yml.
    let out = run_ok(Command::new(&promtool).current_dir(&dir).args([
        "test",
        "rules",
        "alerts_test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn docker_compose_validates_both_stacks() {
    let Some(compose) = tool("docker-compose", "docker-compose") else {
        return;
    };
    let root = workspace_root();
    run_ok(Command::new(&compose).current_dir(&root).args([
        "-f",
        "deploy/docker-compose.yml",
        "config",
        "-q",
    ]));
    run_ok(Command::new(&compose).current_dir(&root).args([
        "-f",
        "deploy/docker-compose.yml",
        "-f",
        "deploy/docker-compose.cluster.yml",
        "config",
        "-q",
    ]));
}

/// What `docker-compose config` does not check: bind-mounted files exist, images are pinned, the
/// Prometheus targets and Grafana paths line up with the services and mounts.
#[test]
fn compose_services_mounts_and_scrape_targets_line_up() {
    let mut services: Vec<(String, Yaml)> = Vec::new();
    for file in ["docker-compose.yml", "docker-compose.cluster.yml"] {
        let doc = yaml(file);
        let map = doc
            .get("services")
            .and_then(Yaml::as_mapping)
            .unwrap_or_else(|| panic!("{file}: no services"));
        for (name, svc) in map {
            services.push((name.as_str().unwrap().to_owned(), svc.clone()));
        }
    }
    let names: HashSet<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "nats",
        "nats-exporter",
        "scheduler",
        "worker",
        "prometheus",
        "grafana",
        "nats-b",
        "nats-c",
    ] {
        assert!(names.contains(want), "service {want} missing");
    }

    let main = yaml("docker-compose.yml");
    let mut images = BTreeSet::new();
    for (name, svc) in &services {
        if let Some(image) = svc.get("image").and_then(Yaml::as_str) {
            images.insert(image.to_owned());
            if image != "hearth:local" {
                let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
                assert!(
                    tag.chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_digit() || c == 'v')
                        && tag.contains('.'),
                    "{name}: image {image} is not pinned to a version"
                );
            }
        }
        for volume in svc
            .get("volumes")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
        {
            let spec = volume.as_str().expect("short volume syntax");
            let source = spec.split(':').next().unwrap();
            if source.starts_with('.') {
                let path = deploy(source);
                assert!(
                    path.exists(),
                    "{name}: bind mount {spec}: {} is missing",
                    path.display()
                );
            }
        }
    }
    let nats_image = str_at(&main, &["services", "nats", "image"]).unwrap();
    assert!(nats_image.starts_with("nats:2."), "{nats_image}");

    // Each scrape target is a compose service on the port the service serves metrics on.
    let ports_of = |service: &str| -> String {
        let svc = services
            .iter()
            .find(|(n, _)| n == service)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("scrape target {service} is not a compose service"));
        serde_yaml::to_string(svc).unwrap()
    };
    for config in ["prometheus.yml", "prometheus-cluster.yml"] {
        let prom = yaml(&format!("prometheus/{config}"));
        let jobs = prom["scrape_configs"].as_sequence().unwrap();
        let mut job_names = BTreeSet::new();
        for job in jobs {
            job_names.insert(job["job_name"].as_str().unwrap().to_owned());
            for sc in job["static_configs"].as_sequence().unwrap() {
                for target in sc["targets"].as_sequence().unwrap() {
                    let target = target.as_str().unwrap();
                    let (host, port) = target.rsplit_once(':').unwrap();
                    if host == "localhost" {
                        continue;
                    }
                    let svc = ports_of(host);
                    assert!(
                        svc.contains(port),
                        "{config}: target {target}: service {host} does not mention port {port}"
                    );
                }
            }
        }
        // The alert rules refer to these job names.
        for job in ["hearth-scheduler", "hearth-worker", "nats"] {
            assert!(job_names.contains(job), "{config}: job {job} missing");
        }
        assert_eq!(
            prom["rule_files"][0].as_str(),
            Some("alerts.yml"),
            "{config} must load the alert rules"
        );
    }
    let alerts = read(&deploy("prometheus/alerts.yml"));
    for job in ["hearth-scheduler", "hearth-worker", "nats"] {
        assert!(
            alerts.contains(&format!("job=\"{job}\"")),
            "alerts.yml never checks job {job}"
        );
    }

    // Grafana: the provider's path is where compose mounts the dashboards, the home dashboard
    // exists there, and every panel uses the provisioned datasource.
    let provider = yaml("grafana/provisioning/dashboards/hearth.yml");
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let grafana = ports_of("grafana");
    assert!(
        grafana.contains(&format!("./grafana/dashboards:{path}")),
        "grafana must mount ./grafana/dashboards at {path}"
    );
    let home = str_at(
        &main,
        &[
            "services",
            "grafana",
            "environment",
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
        ],
    )
    .unwrap();
    assert_eq!(home, format!("{path}/hearth.json"));
    assert!(grafana.contains("./grafana/provisioning:/etc/grafana/provisioning"));
    assert_eq!(
        str_at(
            &main,
            &[
                "services",
                "grafana",
                "environment",
                "GF_AUTH_ANONYMOUS_ENABLED"
            ]
        ),
        Some("true")
    );

    // The scheduler's metrics are off unless configured: compose must turn them on.
    let scheduler = ports_of("scheduler");
    assert!(
        scheduler.contains("HEARTH_METRICS_LISTEN: 0.0.0.0:9101"),
        "{scheduler}"
    );
    let worker = ports_of("worker");
    assert!(
        worker.contains("HEARTH_METRICS_LISTEN: 0.0.0.0:9102"),
        "{worker}"
    );
    assert!(worker.contains("HEARTH_PROVIDER: process"), "{worker}");
    // The Firecracker variant is documented next to it.
    let compose_text = read(&deploy("docker-compose.yml"));
    assert!(compose_text.contains("#     HEARTH_PROVIDER: firecracker"));
    assert!(compose_text.contains("#     - /dev/kvm:/dev/kvm"));
}

fn datasource_uid() -> String {
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let ds = &ds["datasources"][0];
    assert_eq!(ds["type"].as_str(), Some("prometheus"));
    assert_eq!(ds["url"].as_str(), Some("http://prometheus:9090"));
    ds["uid"].as_str().unwrap().to_owned()
}

#[test]
fn dashboard_is_well_formed_grafana_json() {
    let uid = datasource_uid();
    let dash = json("grafana/dashboards/hearth.json");
    assert_eq!(dash["uid"], "hearth-overview");
    assert!(dash["title"].is_string());
    let schema = dash["schemaVersion"].as_u64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");

    let panels = dash["panels"].as_array().unwrap();
    let mut ids = HashSet::new();
    let mut titles = Vec::new();
    let mut occupied: HashSet<(u64, u64)> = HashSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let grid = &panel["gridPos"];
        let (x, y, w, h) = (
            grid["x"].as_u64().unwrap(),
            grid["y"].as_u64().unwrap(),
            grid["w"].as_u64().unwrap(),
            grid["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "panel {id} gridPos {grid}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    occupied.insert((cx, cy)),
                    "panel {id} overlaps another at ({cx},{cy})"
                );
            }
        }
        let kind = panel["type"].as_str().unwrap();
        titles.push(panel["title"].as_str().unwrap().to_owned());
        if kind == "row" {
            continue;
        }
        assert!(
            ["timeseries", "stat", "gauge", "bargauge", "table"].contains(&kind),
            "panel {id}: unexpected type {kind}"
        );
        assert_eq!(panel["datasource"]["uid"], uid.as_str(), "panel {id}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {id} has no queries");
        let mut refs = HashSet::new();
        for target in targets {
            assert_eq!(target["datasource"]["uid"], uid.as_str(), "panel {id}");
            assert!(refs.insert(target["refId"].as_str().unwrap().to_owned()));
            let expr = target["expr"].as_str().unwrap();
            assert!(!expr.trim().is_empty(), "panel {id}: empty expr");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "panel {id}: unbalanced parentheses in {expr}"
            );
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        assert_eq!(var["datasource"]["uid"], uid.as_str());
    }
    // What the issue asks the dashboard to show.
    let all = titles.join(" | ").to_lowercase();
    for want in [
        "claims/s by launch type",
        "claim latency p50 / p99",
        "warm hit ratio",
        "pool ready vs target",
        "refill latency",
        "restore latency",
        "sessions by state",
        "terminations by reason",
        "exec rate",
        "exec latency",
        "lock wait",
        "vms vs capacity",
        "heartbeats",
        "nats health",
    ] {
        assert!(all.contains(want), "no panel for {want:?} in {all}");
    }
}

#[test]
fn every_alert_has_for_severity_and_annotations() {
    let rules = yaml("prometheus/alerts.yml");
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().expect("only alerting rules");
            assert!(names.insert(name.to_owned()), "duplicate alert {name}");
            assert!(rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()));
            let r#for = rule["for"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no for"));
            assert!(
                r#for.ends_with('m') || r#for.ends_with('s'),
                "{name}: for {for}"
            );
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            for key in ["summary", "description"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|s| s.len() > 10),
                    "{name}: annotation {key} missing"
                );
            }
        }
    }
    for want in [
        "HearthPoolEmpty",
        "HearthWarmClaimLatencyHigh",
        "HearthClaimLatencyHigh",
        "HearthWarmHitRatioLow",
        "HearthWorkerDown",
        "HearthSessionsLost",
        "HearthExecTimeoutsRising",
    ] {
        assert!(names.contains(want), "alert {want} missing");
    }
}

#[test]
fn dockerfile_builds_the_workspace_binaries_into_a_slim_runtime() {
    let dockerfile = read(&deploy("Dockerfile"));
    let from: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(from.len(), 2, "multi-stage: {from:?}");
    assert!(from[0].starts_with("rust:1.95-bookworm"), "{from:?}");
    assert!(from[1].starts_with("debian:bookworm-slim"), "{from:?}");
    // The process provider's default sandbox needs bubblewrap + setpriv (util-linux), disk quotas
    // mkfs.ext4 (e2fsprogs), egress slirp4netns + ip (iproute2).
    for pkg in [
        "tini",
        "bubblewrap",
        "util-linux",
        "e2fsprogs",
        "slirp4netns",
        "iproute2",
        "ca-certificates",
    ] {
        assert!(dockerfile.contains(pkg), "runtime image lacks {pkg}");
    }
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/bin/tini", "--"]"#));

    // Every `--bin X` is a binary target of this workspace, and all three are built.
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Json = serde_json::from_slice(&out.stdout).unwrap();
    let bins: BTreeSet<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    let built: BTreeSet<String> = dockerfile
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1].to_owned())
        .collect();
    // The sandbox's first process is the agent, found next to hearth-worker.
    let want: BTreeSet<String> = [
        "hearth",
        "hearth-scheduler",
        "hearth-worker",
        "hearth-guest-agent",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(built, want);
    for bin in &built {
        assert!(
            bins.contains(bin),
            "{bin} is not a workspace binary: {bins:?}"
        );
        assert!(
            dockerfile.contains(&format!("target/release/{bin}")),
            "{bin} is not copied out of the build stage"
        );
    }
    // The build context excludes the local target dirs and tool caches.
    let ignore = read(&deploy("Dockerfile.dockerignore"));
    for entry in ["target/", ".tools/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            "{entry} not ignored"
        );
    }
}
