//! The deployment files: `docker-compose.yml` (validated by Debian's
//! `docker-compose`), `deploy/prometheus/prometheus.yml` (by `promtool`) and
//! the Helm chart `charts/dig-cluster`, whose templates cannot be rendered
//! here (no `helm`): every `.Values` path they use must be defined in
//! `values.yaml`, every value documented, every `{{ }}` balanced, every file
//! they read present, and the settings they give `digctl` must be real ones.
//!
//! `scripts/deploy-tools.sh` installs `docker-compose` and `promtool`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dig_tests::{digctl_path, repo_root};

/// The services the compose file must have.
const COMPOSE_SERVICES: &[&str] = &[
    "api",
    "coordinator",
    "worker",
    "prometheus",
    "grafana",
    "rabbitmq",
    "redis",
    "seaweedfs",
];

const INSTALL_HINT: &str =
    "install it with `scripts/deploy-tools.sh` (apt-get install -y docker-compose prometheus)";

fn chart_dir() -> PathBuf {
    repo_root().join("charts/dig-cluster")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `docker-compose ARGS` on the repository's compose file, in a clean
/// environment so that the caller's variables do not change the result.
fn compose(args: &[&str]) -> Output {
    let root = repo_root();
    let mut cmd = Command::new("docker-compose");
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(&root)
        .arg("--project-directory")
        .arg(&root)
        .arg("-f")
        .arg(root.join("docker-compose.yml"))
        .args(args);
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("docker-compose is not installed: {INSTALL_HINT}")
        }
        Err(e) => panic!("cannot run docker-compose: {e}"),
    }
}

fn compose_ok(args: &[&str]) -> String {
    let out = compose(args);
    assert!(
        out.status.success(),
        "docker-compose {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

// ------------------------------------------------------- a little YAML

/// One `key: value` line of a block-style YAML file.
#[derive(Debug, Clone)]
struct Entry {
    /// Keys from the top, joined by `.`.
    path: String,
    /// The value on the line, unquoted; empty for a key that opens a block.
    value: String,
    /// A `#` comment on the line or on the line(s) right above it.
    documented: bool,
    line: usize,
}

/// Strips a trailing `# comment` that is outside quotes.
fn strip_comment(line: &str) -> (&str, bool) {
    let (mut single, mut double) = (false, false);
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'#' if !single && !double && (i == 0 || bytes[i - 1].is_ascii_whitespace()) => {
                return (line[..i].trim_end(), true);
            }
            _ => {}
        }
    }
    (line.trim_end(), false)
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2
        && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\'')))
    {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

/// The mapping keys of a block-style YAML document, with their paths. Lists
/// are opaque (their items have no `.Values` path), and so are block scalars
/// and flow collections: enough for values.yaml and `docker-compose config`.
fn yaml_entries(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut skip_deeper_than: Option<usize> = None; // inside a block scalar
    let mut list_at: Option<usize> = None; // inside a block list
    let mut comment_above = false;
    for (n, raw) in text.lines().enumerate() {
        let indent = raw.len() - raw.trim_start().len();
        let trimmed = raw.trim();
        if let Some(limit) = skip_deeper_than {
            if trimmed.is_empty() || indent > limit {
                continue;
            }
            skip_deeper_than = None;
        }
        if trimmed.is_empty() || trimmed == "---" {
            comment_above = false;
            continue;
        }
        if trimmed.starts_with('#') {
            comment_above = true;
            continue;
        }
        if let Some(at) = list_at {
            if indent > at || (indent == at && trimmed.starts_with('-')) {
                comment_above = false;
                continue;
            }
            list_at = None;
        }
        if trimmed == "-" || trimmed.starts_with("- ") {
            list_at = Some(indent);
            comment_above = false;
            continue;
        }
        let (content, inline_comment) = strip_comment(trimmed);
        let Some((key, rest)) = split_key(content) else {
            comment_above = false;
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let mut path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        path.push(&key);
        let rest = rest.trim();
        entries.push(Entry {
            path: path.join("."),
            value: unquote(rest),
            documented: comment_above || inline_comment,
            line: n + 1,
        });
        if rest.starts_with('|') || rest.starts_with('>') {
            skip_deeper_than = Some(indent);
        }
        stack.push((indent, key));
        comment_above = false;
    }
    entries
}

/// `key: rest` or `key:`; the key may be quoted.
fn split_key(content: &str) -> Option<(String, &str)> {
    let bytes = content.as_bytes();
    let (mut single, mut double) = (false, false);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b':' if !single && !double && (i + 1 == bytes.len() || bytes[i + 1] == b' ') => {
                let key = unquote(&content[..i]);
                return (!key.is_empty()).then_some((key, &content[i + 1..]));
            }
            _ => {}
        }
    }
    None
}

fn scalars(entries: &[Entry]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|e| (e.path.clone(), e.value.clone()))
        .collect()
}

#[test]
fn yaml_reader_sees_nested_keys_and_skips_lists_and_block_scalars() {
    let doc = "# top\na:\n  # b's doc\n  b: 1 # inline\n  c: \"x: y\"\n  d:\n    - e: 1\n      f: 2\n  g: |\n    h: 3\n  i: {}\nj:\n- k: 1\nl: 'm'\n";
    let entries = yaml_entries(doc);
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["a", "a.b", "a.c", "a.d", "a.g", "a.i", "j", "l"]);
    let v = scalars(&entries);
    assert_eq!(v["a.b"], "1");
    assert_eq!(v["a.c"], "x: y");
    assert_eq!(v["l"], "m");
    let undocumented: Vec<&str> = entries
        .iter()
        .filter(|e| !e.documented)
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(undocumented, ["a.c", "a.d", "a.g", "a.i", "j", "l"]);
}

// ---------------------------------------------------------- docker-compose

#[test]
fn compose_file_is_valid() {
    compose_ok(&["config", "-q"]);
    // The one-shot model upload lives in a profile; it must be valid too.
    compose_ok(&["--profile", "init", "config", "-q"]);
}

fn compose_services() -> BTreeSet<String> {
    compose_ok(&["--profile", "init", "config", "--services"])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn compose_has_every_service() {
    let services = compose_services();
    let missing: Vec<&&str> = COMPOSE_SERVICES
        .iter()
        .filter(|s| !services.contains(**s))
        .collect();
    assert!(
        missing.is_empty(),
        "docker-compose.yml lacks {missing:?} (has {services:?})"
    );
}

/// Seconds of a compose duration such as `90s`, `1m30s`, `2m`.
fn duration_secs(s: &str) -> u64 {
    let (mut total, mut num) = (0u64, String::new());
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            let n: u64 = num.parse().unwrap_or_else(|_| panic!("bad duration {s:?}"));
            num.clear();
            total += n * match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => panic!("bad duration {s:?}"),
            };
        }
    }
    assert!(num.is_empty(), "bad duration {s:?}");
    total
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

/// A scrape job of prometheus.yml: its name and `host:port` targets.
#[derive(Debug)]
struct Job {
    name: String,
    targets: Vec<String>,
}

/// Reads the jobs of prometheus.yml: `job_name`, the `targets: [...]` of its
/// static configs and the `names: [...]` plus `port` of its DNS discovery
/// (flow lists, as the file writes them).
fn prometheus_jobs(text: &str) -> Vec<Job> {
    fn flow_list(s: &str) -> Vec<String> {
        let s = s.trim();
        assert!(
            s.starts_with('[') && s.ends_with(']'),
            "prometheus.yml: write target lists as [\"host:port\", ...], got {s}"
        );
        s[1..s.len() - 1]
            .split(',')
            .map(unquote)
            .filter(|t| !t.is_empty())
            .collect()
    }
    let mut jobs: Vec<Job> = Vec::new();
    let mut dns_names: Vec<String> = Vec::new();
    for raw in text.lines() {
        let (line, _) = strip_comment(raw.trim());
        let line = line.trim_start_matches("- ").trim();
        if let Some(name) = line.strip_prefix("job_name:") {
            jobs.push(Job {
                name: unquote(name),
                targets: Vec::new(),
            });
            dns_names.clear();
        } else if let Some(list) = line.strip_prefix("targets:") {
            let job = jobs.last_mut().expect("targets before any job_name");
            job.targets.extend(flow_list(list));
        } else if let Some(list) = line.strip_prefix("names:") {
            dns_names = flow_list(list);
        } else if let Some(port) = line.strip_prefix("port:") {
            let job = jobs.last_mut().expect("port before any job_name");
            let port = port.trim();
            job.targets
                .extend(dns_names.drain(..).map(|n| format!("{n}:{port}")));
        }
    }
    jobs
}

#[test]
fn prometheus_config_is_valid_and_scrapes_the_compose_services() {
    let file = repo_root().join("deploy/prometheus/prometheus.yml");
    let out = match Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(&file)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("promtool (Debian package prometheus) is not installed: {INSTALL_HINT}")
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    assert!(
        out.status.success(),
        "promtool check config:\n{}",
        text(&out)
    );

    let services = compose_services();
    let config = scalars(&yaml_entries(&compose_ok(&["config"])));
    let jobs = prometheus_jobs(&read(&file));
    let mut problems = Vec::new();
    for job in &jobs {
        if !services.contains(&job.name) {
            problems.push(format!("job {} names no compose service", job.name));
        }
        if job.targets.is_empty() {
            problems.push(format!("job {} has no targets", job.name));
        }
        for target in &job.targets {
            let host = target.split(':').next().unwrap();
            if host != "localhost" && !services.contains(host) {
                problems.push(format!(
                    "job {}: target {target} is no compose service",
                    job.name
                ));
            }
        }
    }
    // The three dig-cluster services, on the ports they listen on.
    let listen = |service: &str, var: &str| {
        config
            .get(&format!("services.{service}.environment.{var}"))
            .unwrap_or_else(|| panic!("docker-compose.yml: {service} does not set {var}"))
            .clone()
    };
    for (service, var) in [
        ("api", "DIG_API_LISTEN"),
        ("coordinator", "DIG_METRICS_LISTEN"),
        ("worker", "DIG_METRICS_LISTEN"),
    ] {
        let addr = listen(service, var);
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{service}: {var}={addr} is not reachable from other containers"
        );
        let want = format!("{service}:{}", port_of(&addr));
        match jobs.iter().find(|j| j.name == service) {
            None => problems.push(format!("no scrape job for {service}")),
            Some(job) if !job.targets.contains(&want) => problems.push(format!(
                "job {service} scrapes {:?}, but {service} serves /metrics on {want}",
                job.targets
            )),
            Some(_) => {}
        }
    }
    assert!(
        problems.is_empty(),
        "prometheus.yml:\n{}",
        problems.join("\n")
    );

    // A stopped worker must get to requeue its shard before it is killed.
    let grace: u64 = listen("worker", "DIG_WORKER_SHUTDOWN_GRACE_SECS")
        .parse()
        .expect("DIG_WORKER_SHUTDOWN_GRACE_SECS is a number");
    let stop = duration_secs(
        config
            .get("services.worker.stop_grace_period")
            .expect("worker has a stop_grace_period"),
    );
    assert!(
        grace < stop,
        "worker: DIG_WORKER_SHUTDOWN_GRACE_SECS={grace} must be below stop_grace_period ({stop}s)"
    );
}

#[test]
fn grafana_gets_the_dashboard_and_the_datasource() {
    let compose = read(&repo_root().join("docker-compose.yml"));
    for path in [
        "./charts/dig-cluster/dashboards/dig-cluster.json",
        "./deploy/grafana/provisioning",
        "./deploy/prometheus/prometheus.yml",
        "./deploy/rabbitmq/20-dig.conf",
        "./deploy/compose/api-keys",
        "./deploy/compose/webhook-secrets",
    ] {
        assert!(
            compose.contains(path),
            "docker-compose.yml does not mount {path}"
        );
        assert!(
            repo_root().join(path).exists(),
            "{path}, used by docker-compose.yml, does not exist"
        );
    }
    let provisioning = repo_root().join("deploy/grafana/provisioning");
    let ds = scalars(&yaml_entries(&read(
        &provisioning.join("datasources/prometheus.yml"),
    )));
    assert_eq!(ds.get("apiVersion").map(String::as_str), Some("1"));
    let ds = read(&provisioning.join("datasources/prometheus.yml"));
    assert!(ds.contains("url: http://prometheus:9090"), "{ds}");
    let dash = read(&provisioning.join("dashboards/dig-cluster.yml"));
    assert!(dash.contains("path: /var/lib/grafana/dashboards"), "{dash}");
    assert!(compose.contains(":/var/lib/grafana/dashboards/dig-cluster.json:ro"));
}

/// Runs `digctl api` with `vars` (and the config file `config`, if any) and
/// checks that the configuration was accepted: it then stops at the missing
/// API keys file, before touching any server.
fn assert_settings_accepted(what: &str, config: Option<&Path>, vars: &BTreeMap<String, String>) {
    let mut cmd = Command::new(digctl_path());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(vars)
        .env("DIG_API_KEYS_FILE", "/nonexistent/dig-api-keys")
        .env_remove("DIG_API_WEBHOOK_SECRETS_FILE")
        .env("DIG_LOG", "warn")
        .arg("api");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd.output().expect("run digctl");
    let msg = text(&out);
    assert!(
        !out.status.success() && msg.contains("API keys file"),
        "{what}: digctl did not accept the settings (expected it to stop at the missing keys file):\n{msg}"
    );
}

#[test]
fn compose_settings_are_real_settings() {
    let config = scalars(&yaml_entries(&compose_ok(&["--profile", "init", "config"])));
    let vars: BTreeMap<String, String> = config
        .iter()
        .filter_map(|(path, value)| {
            let (_, var) = path.split_once(".environment.")?;
            var.starts_with("DIG_")
                .then(|| (var.to_string(), value.clone()))
        })
        .collect();
    assert!(vars.contains_key("DIG_STORE_KIND"), "{vars:?}");
    assert!(vars.contains_key("DIG_METRICS_LISTEN"), "{vars:?}");
    assert_settings_accepted("docker-compose.yml", None, &vars);
}

// ---------------------------------------------------------------- the chart

/// The chart's template files (`templates/*.yaml`, `*.tpl`, `NOTES.txt`).
fn templates() -> Vec<(String, String)> {
    let dir = chart_dir().join("templates");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".yaml") || name.ends_with(".tpl") || name == "NOTES.txt"
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read(&p),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 5, "too few templates in {}", dir.display());
    files
}

/// Every `.Values.a.b.c` in `text` (also `$.Values...`), as `a.b.c`.
fn values_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(".Values.") {
        let tail = &rest[at + ".Values.".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(tail.len());
        let path = tail[..end].trim_end_matches('.');
        if !path.is_empty() {
            out.push(path.to_string());
        }
        rest = &tail[end..];
    }
    out
}

fn values_entries() -> Vec<Entry> {
    yaml_entries(&read(&chart_dir().join("values.yaml")))
}

#[test]
fn chart_uses_only_values_defined_in_values_yaml() {
    let defined: BTreeSet<String> = values_entries().into_iter().map(|e| e.path).collect();
    let mut undefined = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (name, text) in templates() {
        for path in values_paths(&text) {
            if !defined.contains(&path) {
                undefined.insert(format!("{name}: .Values.{path}"));
            }
            used.insert(path);
        }
    }
    assert!(
        undefined.is_empty(),
        "used in templates but not defined in charts/dig-cluster/values.yaml:\n{}",
        undefined.into_iter().collect::<Vec<_>>().join("\n")
    );
    // The other way round, a warning only: values no template reads.
    let unused: Vec<&String> = defined
        .iter()
        .filter(|d| {
            !used.iter().any(|u| {
                u == *d || u.starts_with(&format!("{d}.")) || d.starts_with(&format!("{u}."))
            })
        })
        .collect();
    if !unused.is_empty() {
        eprintln!("warning: values.yaml values no template reads: {unused:?}");
    }
}

#[test]
fn chart_values_are_all_documented() {
    let undocumented: Vec<String> = values_entries()
        .into_iter()
        .filter(|e| !e.documented)
        .map(|e| format!("line {}: {}", e.line, e.path))
        .collect();
    assert!(
        undocumented.is_empty(),
        "values.yaml values without a comment (above or on the line):\n{}",
        undocumented.join("\n")
    );
}

#[test]
fn chart_templates_have_balanced_delimiters() {
    let mut problems = Vec::new();
    for (name, text) in templates() {
        let (mut open, mut line_opened) = (false, 0);
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            loop {
                let next_open = rest.find("{{");
                let next_close = rest.find("}}");
                match (next_open, next_close) {
                    (Some(o), c) if c.is_none_or(|c| o < c) => {
                        if open {
                            problems.push(format!(
                                "{name}:{}: `{{{{` inside an action opened on line {line_opened}",
                                n + 1
                            ));
                        }
                        open = true;
                        line_opened = n + 1;
                        rest = &rest[o + 2..];
                    }
                    (_, Some(c)) => {
                        if !open {
                            problems.push(format!("{name}:{}: `}}}}` without `{{{{`", n + 1));
                        }
                        open = false;
                        rest = &rest[c + 2..];
                    }
                    _ => break,
                }
            }
        }
        if open {
            problems.push(format!("{name}:{line_opened}: `{{{{` never closed"));
        }
        let (begins, ends) = block_balance(&text);
        if begins != ends {
            problems.push(format!(
                "{name}: {begins} if/range/with/define blocks but {ends} ends"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Counts actions that open a block (`if`, `range`, `with`, `define`,
/// `block`) and `end`s.
fn block_balance(text: &str) -> (usize, usize) {
    let (mut begins, mut ends) = (0, 0);
    for action in text.split("{{").skip(1) {
        let action = action.split("}}").next().unwrap_or("");
        let word = action
            .trim_start_matches('-')
            .trim_start()
            .split(|c: char| c.is_whitespace() || c == '}' || c == '-')
            .next()
            .unwrap_or("");
        match word {
            "if" | "range" | "with" | "define" | "block" => begins += 1,
            "end" => ends += 1,
            _ => {}
        }
    }
    (begins, ends)
}

#[test]
fn chart_files_read_by_templates_exist() {
    let mut gets = Vec::new();
    for (name, text) in templates() {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".Files.Get \"") {
            let tail = &rest[at + ".Files.Get \"".len()..];
            let end = tail.find('"').expect("closing quote");
            gets.push((name.clone(), tail[..end].to_string()));
            rest = &tail[end..];
        }
    }
    assert!(
        gets.iter().any(|(_, f)| f == "dashboards/dig-cluster.json"),
        "the dashboard ConfigMap must read dashboards/dig-cluster.json: {gets:?}"
    );
    for (name, file) in gets {
        let path = chart_dir().join(&file);
        assert!(
            path.is_file(),
            "{name} reads {file}, but {} does not exist",
            path.display()
        );
        if file.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&read(&path))
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        }
    }
}

#[test]
fn chart_metadata_is_complete() {
    let chart = scalars(&yaml_entries(&read(&chart_dir().join("Chart.yaml"))));
    assert_eq!(chart.get("apiVersion").map(String::as_str), Some("v2"));
    assert_eq!(chart.get("name").map(String::as_str), Some("dig-cluster"));
    assert!(chart.get("version").is_some_and(|v| !v.is_empty()));
    for f in [
        "values.yaml",
        "templates/_helpers.tpl",
        "templates/NOTES.txt",
    ] {
        assert!(
            chart_dir().join(f).is_file(),
            "charts/dig-cluster/{f} is missing"
        );
    }
    // The dashboard ConfigMap carries the sidecar's label.
    let values = scalars(&values_entries());
    assert_eq!(
        values
            .get("dashboard.labels.grafana_dashboard")
            .map(String::as_str),
        Some("1")
    );
}

/// The configuration the chart gives `digctl` is accepted by it: the TOML the
/// ConfigMap template writes (rebuilt here from values.yaml the same way:
/// sections store, api, coordinator, worker plus the keys the template sets)
/// and every DIG_* variable the templates set.
#[test]
fn chart_settings_are_real_settings() {
    let values = scalars(&values_entries());
    let toml_value = |v: &str| {
        if v.parse::<u64>().is_ok() || v == "true" || v == "false" {
            v.to_string()
        } else {
            format!("{v:?}")
        }
    };
    let mut toml = format!("namespace = {}\n", toml_value(&values["config.namespace"]));
    let fixed: &[(&str, &[(&str, &str)])] = &[
        ("store", &[]),
        (
            "api",
            &[
                ("listen", "\"0.0.0.0:8080\""),
                ("keys_file", "\"/etc/dig/api-keys/api-keys\""),
                (
                    "webhook_secrets_file",
                    "\"/etc/dig/webhook-secrets/webhook-secrets\"",
                ),
                ("spool_dir", "\"/var/lib/dig/spool\""),
            ],
        ),
        ("coordinator", &[]),
        ("worker", &[("cache_dir", "\"/var/lib/dig/cache\"")]),
    ];
    for (section, keys) in fixed {
        toml.push_str(&format!("[{section}]\n"));
        for (k, v) in *keys {
            toml.push_str(&format!("{k} = {v}\n"));
        }
        let prefix = format!("config.{section}.");
        for (path, value) in &values {
            if let Some(key) = path.strip_prefix(&prefix) {
                if !value.is_empty() && !key.contains('.') {
                    toml.push_str(&format!("{key} = {}\n", toml_value(value)));
                }
            }
        }
    }
    // The template, checked for the keys it writes itself.
    let configmap = read(&chart_dir().join("templates/configmap.yaml"));
    for (section, keys) in fixed {
        assert!(
            configmap.contains(&format!("[{section}]")),
            "configmap.yaml lacks [{section}]"
        );
        for (k, _) in *keys {
            assert!(
                configmap.contains(&format!("{k} = ")),
                "configmap.yaml lacks {k}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, &toml).unwrap();

    // The DIG_* variables the templates set, with values of the right shape.
    let mut vars = BTreeMap::new();
    for (_, text) in templates() {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("name: DIG_") {
            let tail = &rest[at + "name: ".len()..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let var = &tail[..end];
            let value = if var.ends_with("_SECS") {
                "60"
            } else if var.ends_with("_LISTEN") {
                "0.0.0.0:9100"
            } else {
                "x"
            };
            vars.insert(var.to_string(), value.to_string());
            rest = &tail[end..];
        }
    }
    vars.remove("DIG_CONFIG"); // the file is given with --config
    assert!(
        vars.contains_key("DIG_WORKER_SHUTDOWN_GRACE_SECS"),
        "{vars:?}"
    );
    assert!(vars.contains_key("DIG_METRICS_LISTEN"), "{vars:?}");
    assert_settings_accepted(&format!("the chart's config\n{toml}"), Some(&file), &vars);
}
