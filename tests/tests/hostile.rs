//! Hostile input against `digctl standalone` (the same router and handlers
//! as `digctl api`): identifiers built to escape the object store (path
//! traversal, encoded separators, NUL, odd characters, huge values) on
//! every route that takes one, bodies past the size limits, a client that
//! stalls mid-body or trickles its headers, and one tenant reaching for
//! another's job. Each gets a
//! 4xx with a JSON error naming the problem, never a 5xx, and the store
//! holds nothing but what the well-formed requests made.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use dig_tests::cluster::{Cluster, SEQUENCE};

/// Ids meant to escape: traversal (plain and percent-encoded), NUL, a
/// backslash, unicode, glob characters, a very long one.
fn hostile_ids() -> Vec<String> {
    vec![
        "..".into(),
        "..%2F..%2Fetc%2Fpasswd".into(),
        "%2e%2e%2f%2e%2e%2fapi-keys".into(),
        "..%5C..%5Cwindows".into(),
        "a%00b".into(),
        "%C3%A9t%C3%A9".into(),
        "*".into(),
        "0190d3a0-0000-7000-8000-00000000000%2F".into(),
        "x".repeat(5000),
    ]
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {body}"));
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code: {body}"))
        .to_string()
}

#[test]
fn hostile_identifiers_bodies_and_clients_get_4xx_and_touch_nothing() {
    let (c, _svc) = Cluster::standalone_with("hostile", |c| {
        c.set_env("DIG_API_REQUEST_TIMEOUT_SECS", "2");
    });
    let sha = c.upload_features(&c.key_a);
    let (status, text) = c.api_post(
        &c.key_a,
        "/v1/jobs",
        &serde_json::json!({"sequence": SEQUENCE, "features_sha256": sha, "num_samples": 2, "steps": 2}),
    );
    assert_eq!(status, 202, "{text}");
    let job = serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let data = c.dir.path().join("data");
    let before = files_under(&data);

    // Every route with an id, every hostile id: 400 or 404, JSON, no 5xx.
    let mut checked = 0;
    for id in hostile_ids() {
        for route in [
            format!("/v1/jobs/{id}"),
            format!("/v1/jobs/{id}/events"),
            format!("/v1/jobs/{id}/results"),
            format!("/v1/jobs/{id}/results.pdb"),
            format!("/v1/jobs/{id}/results.xtc"),
            format!("/v1/jobs/{id}/topology.pdb"),
            format!("/v1/jobs/{id}/results/0"),
            format!("/v1/jobs/{job}/results/{id}"),
            format!("/v1/batches/{id}"),
        ] {
            let (status, body) = c.api_get(&c.key_a, &route);
            assert!(
                status == 400 || status == 404,
                "GET {route}: {status} {body}"
            );
            error_code(&body);
            checked += 1;
        }
        for route in [
            format!("/v1/jobs/{id}/cancel"),
            format!("/v1/batches/{id}/cancel"),
        ] {
            let (status, body) = c.api_post(&c.key_a, &route, &serde_json::json!({}));
            assert!(
                status == 400 || status == 404,
                "POST {route}: {status} {body}"
            );
            error_code(&body);
            checked += 1;
        }
    }
    // Shard numbers that are not shard numbers.
    for shard in [
        "-1",
        "99999999999999999999999",
        "1.5",
        "0.npz%2F..",
        "0.pdb.pdb",
    ] {
        let (status, body) = c.api_get(&c.key_a, &format!("/v1/jobs/{job}/results/{shard}"));
        assert!(
            status == 400 || status == 404,
            "shard {shard}: {status} {body}"
        );
        checked += 1;
    }
    eprintln!("{checked} hostile requests answered 400/404");

    // Identifiers inside a submission name their field.
    for (field, value, message) in [
        ("features_sha256", "../../api-keys", "features_sha256:"),
        (
            "features_sha256",
            &"A".repeat(64) as &str,
            "features_sha256:",
        ),
        ("model", "../../etc", "model: invalid name '../../etc'"),
        ("model", "a/b", "model: invalid name 'a/b'"),
        ("model", ".hidden", "model: invalid name '.hidden'"),
        ("model", "a\u{0}b", "model: invalid name"),
    ] {
        let mut req =
            serde_json::json!({"sequence": SEQUENCE, "features_sha256": sha, "num_samples": 1});
        req[field] = value.into();
        let (status, body) = c.api_post(&c.key_a, "/v1/jobs", &req);
        assert_eq!(status, 400, "{field}={value:?}: {body}");
        assert!(body.contains(message), "{field}={value:?}: {body}");
    }

    // Bodies past the limits: 413 before anything is parsed.
    let big = format!(
        "{{\"sequence\": \"{SEQUENCE}\", \"features_sha256\": \"{sha}\", \"num_samples\": 1, \"name\": \"{}\"}}",
        "x".repeat(3 << 20)
    );
    let (status, body) = raw_post(&c, "/v1/jobs", big.as_bytes(), Duration::ZERO);
    assert_eq!(status, 413, "{body}");

    // A client that stalls mid-body: 408 after the request timeout (2 s),
    // the connection not held open.
    let t = Instant::now();
    let (status, body) = raw_post(&c, "/v1/jobs", b"{\"sequence\": ", Duration::from_secs(60));
    assert_eq!(status, 408, "{body}");
    assert_eq!(error_code(&body), "request_timeout");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // A client that trickles its headers (slowloris), and one that opens
    // a connection and sends nothing: both disconnected after the same 2 s
    // (the header deadline), not held open.
    let addr = c.api_url.trim_start_matches("http://");
    for start in [&b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: "[..], b""] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(start).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let t = Instant::now();
        let mut reply = Vec::new();
        let read = s.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            match &read {
                Ok(_) => reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            },
            "{start:?}: {read:?} {reply:?} after {:?}",
            t.elapsed()
        );
        assert!(
            t.elapsed() >= Duration::from_secs(1) && t.elapsed() < Duration::from_secs(20),
            "{start:?}: closed after {:?}",
            t.elapsed()
        );
    }

    // Another tenant's job does not exist for this one, whatever the route.
    for route in [
        format!("/v1/jobs/{job}"),
        format!("/v1/jobs/{job}/results"),
        format!("/v1/jobs/{job}/results.xtc"),
        format!("/v1/jobs/{job}/results/0"),
    ] {
        let (status, body) = c.api_get(&c.key_b, &route);
        assert_eq!(status, 404, "tenant b GET {route}: {body}");
    }
    let (status, _) = c.api_post(
        &c.key_b,
        &format!("/v1/jobs/{job}/cancel"),
        &serde_json::json!({}),
    );
    assert_eq!(status, 404);
    // ... and the owner's job was not cancelled by it.
    assert_ne!(c.status(&c.key_a, &job)["state"], "cancelled");

    // Nothing new in the store but what the job itself writes (its shards,
    // manifest; the embedded worker's cache of its model and features), and
    // nothing anywhere else in the deployment's directory.
    let after = files_under(&data);
    for f in after.difference(&before) {
        assert!(
            f.contains(&format!("jobs/{job}/")) || f.starts_with("cache/"),
            "a hostile request left {f} in the store"
        );
    }
    for entry in std::fs::read_dir(c.dir.path()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            ["data", "api-keys", "spool", "cache", "standalone.log"].contains(&name.as_str()),
            "unexpected {name} beside the store"
        );
    }
}

/// Every file below `dir`, as paths relative to it.
fn files_under(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_string_lossy().to_string());
            }
        }
    }
    out
}

/// POSTs `body` with a Content-Length of `body.len() + pending` when
/// `stall` is non-zero (the client then waits up to `stall` for an answer
/// without sending the rest); the status and body of the reply.
fn raw_post(c: &Cluster, path: &str, body: &[u8], stall: Duration) -> (u16, String) {
    let addr = c.api_url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    let declared = if stall.is_zero() {
        body.len()
    } else {
        body.len() + 100
    };
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n",
        c.key_a
    )
    .unwrap();
    // The server may answer (413) before taking the whole body.
    let _ = s.write_all(body);
    if !stall.is_zero() {
        s.set_read_timeout(Some(stall)).unwrap();
    }
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).to_string();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A directory name with everything a shell or a careless join could
/// trip on: spaces, quotes, `$VAR`, backticks, glob characters, unicode.
const ODD: &str = "odd dir ü ✓ $HOME `id` ;'\"*?[x]";

/// `digctl sample` of one 2-step sample of the fixture into `out`.
fn one_sample_into(out: &std::path::Path) -> Vec<String> {
    let path = |p: std::path::PathBuf| p.to_str().unwrap().to_string();
    let mut args: Vec<String> = vec!["sample".into(), "--model".into()];
    args.push(path(dig_tests::fixture("")));
    args.push("--features".into());
    args.push(path(dig_tests::fixture("features.npz")));
    for a in [
        "--sequence",
        SEQUENCE,
        "--num-samples",
        "1",
        "--steps",
        "2",
        "--out",
    ] {
        args.push(a.into());
    }
    args.push(path(out.to_path_buf()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Every path under `root`, relative, sorted.
fn tree(root: &std::path::Path) -> Vec<String> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn odd_characters_in_data_dir_and_out_paths_are_taken_literally() {
    let (c, mut svc) = Cluster::standalone_with("odd-dirs", |c| c.data_name = ODD.into());
    let sha = c.upload_features(&c.key_a);
    let job = c.submit(
        &c.key_a,
        &sha,
        4,
        &["--steps", "3", "--shard-size", "2", "--seed", "5"],
    );
    let view = c.wait_final(&c.key_a, &job, Duration::from_secs(300), &mut [&mut svc]);
    assert_eq!(view["state"], "succeeded", "{view}");
    let out = c.dir.path().join(format!("{ODD} out"));
    let fetched = c.client_ok(&c.key_a, &["fetch", &job, "--out", out.to_str().unwrap()]);
    assert!(out.join("manifest.json").is_file(), "{fetched}");
    assert!(out.join("shards/000000.npz").is_file());
    assert!(out.join("shards/000001.npz").is_file());

    // `digctl sample --out` with the same name, one level down.
    let sample_out = c.dir.path().join(ODD).join(ODD);
    dig_tests::digctl_ok(&strs(&one_sample_into(&sample_out)));
    assert!(sample_out.join("samples.npz").is_file());
    drop(svc);

    // Nothing was made anywhere else: only the two odd directories, the
    // keys file, the spool and the logs sit beside each other, and no `$HOME` or
    // glob was expanded into another name.
    let top: Vec<String> = std::fs::read_dir(c.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    let mut top = top;
    top.sort();
    // (`spool`: the uploads' spool directory every test deployment sets.)
    let mut want = vec![
        ODD.to_string(),
        format!("{ODD} out"),
        "api-keys".into(),
        "spool".into(),
    ];
    want.sort();
    assert_eq!(top, want);
    let data = tree(&c.dir.path().join(ODD));
    assert!(
        data.iter().all(|p| p.starts_with(ODD)
            || p.starts_with("store")
            || p.starts_with("cache")
            || p.starts_with("uploads")
            || p.starts_with("api-key")),
        "{data:?}"
    );
    assert!(
        data.iter()
            .any(|p| p.contains(&format!("jobs/{job}/shards/000001.npz"))),
        "{data:?}"
    );
}

#[test]
fn hostile_ids_and_unusable_paths_on_the_command_line_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A job id that is a path: refused before any request or file.
    for id in [
        "../../etc/passwd",
        "..",
        "a/b",
        "0190d3a0-0000-7000-8000-00000000000/",
    ] {
        let out = dir.path().join("fetched");
        let err = dig_tests::digctl_err(&["fetch", id, "--out", out.to_str().unwrap()]);
        assert!(
            err.contains("invalid value") && err.contains(id),
            "{id}: {err}"
        );
        assert!(!out.exists(), "{id}: {} was created", out.display());
    }
    // --data-dir and --out that are files, not directories.
    let file = dir.path().join("a file");
    std::fs::write(&file, "x").unwrap();
    let err = dig_tests::digctl_err(&[
        "standalone",
        "--data-dir",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        err.contains("cannot create the data directory") && err.contains("a file"),
        "{err}"
    );
    let err = dig_tests::digctl_err(&strs(&one_sample_into(&file)));
    assert!(err.contains("a file"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}
