//! `digctl train` and `digctl features synth` as users run them: a short run
//! whose model `digctl sample` loads, `--resume`, and every bad input with
//! its message.

use std::path::{Path, PathBuf};

use dig_tests::{digctl_err, digctl_ok, python, repo_root};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn adk(name: &str) -> PathBuf {
    repo_root().join("examples/adk").join(name)
}

/// The first `n` residues of the AdK closed structure as a PDB, and
/// synthetic features for them, in `dir`.
fn fragment(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(adk("closed.pdb")).unwrap();
    let mut out = String::new();
    let mut seq = String::new();
    let mut last = String::new();
    for line in text.lines() {
        if line.starts_with("ATOM") {
            let resid = line[22..26].trim().to_string();
            if resid != last {
                if seq.len() == n {
                    break;
                }
                let name = &line[17..20];
                seq.push(dig_model::backbone::one_letter(name));
                last = resid;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("END\n");
    let pdb = dir.join("frag.pdb");
    std::fs::write(&pdb, out).unwrap();
    let feats = dir.join("frag.npz");
    digctl_ok(&["features", "synth", "--sequence", &seq, "--out", s(&feats)]);
    (pdb, feats)
}

fn manifest(dir: &Path, lines: &[String]) -> PathBuf {
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// A manifest of one trajectory: the 20-residue fragment and its features.
fn fragment_manifest(dir: &Path) -> (PathBuf, PathBuf) {
    let (pdb, feats) = fragment(dir, 20);
    let data = manifest(
        dir,
        &[format!(
            r#"{{"trajectory": "{}", "features": "{}"}}"#,
            pdb.file_name().unwrap().to_str().unwrap(),
            feats.file_name().unwrap().to_str().unwrap()
        )],
    );
    (data, feats)
}

/// [`tiny_train`]'s arguments, fine-tuning `init` instead of a fresh `--size`.
fn tiny_tune<'a>(data: &'a str, out: &'a str, init: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = tiny_train(data, out, extra);
    let size = args.iter().position(|a| *a == "--size").unwrap();
    args.drain(size..size + 2);
    args.extend_from_slice(&["--init", init]);
    args
}

fn tiny_train<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--size",
        "32,16,2,4,64",
        "--val-fraction",
        "0",
        "--log-every",
        "1",
        "--threads",
        "1",
    ];
    if !extra.contains(&"--batch-size") {
        v.extend_from_slice(&["--batch-size", "2"]);
    }
    v.extend_from_slice(extra);
    v
}

#[test]
fn a_short_run_gives_a_model_that_sample_loads_and_resume_extends_it() {
    let dir = tempfile::tempdir().unwrap();
    let (data, feats) = fragment_manifest(dir.path());
    let out = dir.path().join("model");
    digctl_ok(&tiny_train(s(&data), s(&out), &["--steps", "4"]));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(summary["steps_done"], 4);
    assert_eq!(summary["finished"], true);
    assert_eq!(summary["history"].as_array().unwrap().len(), 4);
    assert_eq!(summary["data"]["trajectories"][0]["residues"], 20);
    assert_eq!(summary["hyperparameters"]["batch_size"], 2);
    assert!(summary["time"]["seconds"].as_f64().unwrap() > 0.0);

    // --stop-at stops a run part-way along its schedule; --resume then
    // finishes it with the same bytes as the run that never stopped.
    let staged = dir.path().join("staged");
    let err = digctl_err(&tiny_train(
        s(&data),
        s(&staged),
        &["--steps", "4", "--stop-at", "5"],
    ));
    assert!(
        err.contains("--stop-at must be between 1 and --steps (4), got 5"),
        "{err}"
    );
    digctl_ok(&tiny_train(
        s(&data),
        s(&staged),
        &["--steps", "4", "--stop-at", "2"],
    ));
    let part: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(staged.join("training.json")).unwrap())
            .unwrap();
    assert_eq!(part["steps_done"], 2);
    assert_eq!(part["finished"], false);
    let err = digctl_err(&tiny_train(
        s(&data),
        s(&staged),
        &["--steps", "4", "--stop-at", "1", "--resume"],
    ));
    assert!(
        err.contains("is at update 2, already past --stop-at 1"),
        "{err}"
    );
    digctl_ok(&tiny_train(
        s(&data),
        s(&staged),
        &["--steps", "4", "--resume"],
    ));
    assert_eq!(
        std::fs::read(staged.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap(),
        "stopped at 2 and resumed differs from 4 updates in one go"
    );

    // The output is a model directory that `digctl sample` loads unchanged.
    let run = dir.path().join("samples");
    digctl_ok(&[
        "sample",
        "--model",
        s(&out),
        "--features",
        s(&feats),
        "--num-samples",
        "2",
        "--steps",
        "5",
        "--out",
        s(&run),
    ]);
    assert!(run.join("samples.npz").is_file());

    // Training again into the same folder needs --resume; --resume extends.
    let err = digctl_err(&tiny_train(s(&data), s(&out), &["--steps", "6"]));
    assert!(
        err.contains("already holds a training run") && err.contains("--resume"),
        "{err}"
    );
    digctl_ok(&tiny_train(
        s(&data),
        s(&out),
        &["--steps", "6", "--resume"],
    ));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(summary["steps_done"], 6);
    assert_eq!(summary["history"].as_array().unwrap().len(), 6);

    // Changed options are refused on resume, naming the option.
    let err = digctl_err(&tiny_train(
        s(&data),
        s(&out),
        &["--steps", "8", "--resume", "--lr", "0.01"],
    ));
    assert!(err.contains("lr: checkpoint 0.001 vs now 0.01"), "{err}");
    let fresh = dir.path().join("fresh");
    let err = digctl_err(&tiny_train(
        s(&data),
        s(&fresh),
        &["--steps", "2", "--resume"],
    ));
    assert!(err.contains("no checkpoint to resume from"), "{err}");
}

#[test]
fn chiral_features_are_added_to_a_trained_model_and_sample_loads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (data, feats) = fragment_manifest(dir.path());
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let base = dir.path().join("base");
    digctl_ok(&tiny_train(s(&data), s(&base), &["--steps", "2"]));
    assert!(read(&base.join("config.json"))
        .get("chiral_features")
        .is_none());

    // Fine-tuning with --chiral-features adds them (zero) and trains them.
    let tuned = dir.path().join("tuned");
    digctl_ok(&tiny_tune(
        s(&data),
        s(&tuned),
        s(&base),
        &["--steps", "3", "--chiral-features"],
    ));
    assert_eq!(read(&tuned.join("config.json"))["chiral_features"], true);
    let summary = read(&tuned.join("training.json"));
    assert_eq!(
        summary["init"]["added"], "chiral_features",
        "{}",
        summary["init"]
    );
    assert_eq!(summary["model"]["chiral_features"], true);
    // Two layers, 4 heads: 4 triples into d_model 32; moved off zero by training.
    let weights = tch::Tensor::read_safetensors(tuned.join("model.safetensors")).unwrap();
    let chiral: Vec<_> = weights
        .iter()
        .filter(|(k, _)| k.ends_with("attn.chiral_out.weight"))
        .collect();
    assert_eq!(chiral.len(), 2);
    for (k, t) in chiral {
        assert_eq!(t.size(), vec![32, 4], "{k}");
        assert!(t.abs().max().double_value(&[]) > 0.0, "{k} is still zero");
    }

    // The sampler loads it unchanged.
    let run = dir.path().join("samples");
    digctl_ok(&[
        "sample",
        "--model",
        s(&tuned),
        "--features",
        s(&feats),
        "--num-samples",
        "2",
        "--steps",
        "5",
        "--out",
        s(&run),
    ]);
    assert!(run.join("samples.npz").is_file());

    // --orientation-features likewise (with exact targets at high noise,
    // which training.json records): added at zero, trained, loadable.
    let oriented = dir.path().join("oriented");
    digctl_ok(&tiny_tune(
        s(&data),
        s(&oriented),
        s(&base),
        &[
            "--steps",
            "3",
            "--orientation-features",
            "--exact-target-above",
            "0.5",
        ],
    ));
    assert_eq!(
        read(&oriented.join("config.json"))["orientation_features"],
        true
    );
    let summary = read(&oriented.join("training.json"));
    assert_eq!(summary["init"]["added"], "orientation_features");
    assert_eq!(summary["hyperparameters"]["exact_target_above"], 0.5);
    let weights = tch::Tensor::read_safetensors(oriented.join("model.safetensors")).unwrap();
    let out: Vec<_> = weights
        .iter()
        .filter(|(k, _)| k.ends_with("attn.orient_out.weight"))
        .collect();
    assert_eq!(out.len(), 2);
    for (k, t) in out {
        // 4 heads x 4 directions x 3 into d_model 32.
        assert_eq!(t.size(), vec![32, 48], "{k}");
        assert!(t.abs().max().double_value(&[]) > 0.0, "{k} is still zero");
    }
    let run = dir.path().join("oriented-samples");
    digctl_ok(&[
        "sample",
        "--model",
        s(&oriented),
        "--features",
        s(&feats),
        "--num-samples",
        "2",
        "--steps",
        "5",
        "--out",
        s(&run),
    ]);
    assert!(run.join("samples.npz").is_file());

    // --tr-sigma-max replaces the schedule's largest translation noise: one
    // update at that noise, into `dir/name`, with what the run printed.
    let tune_at = |name: &str, sigma: &str| {
        let out = dir.path().join(name);
        let text = digctl_ok(&tiny_tune(
            s(&data),
            s(&out),
            s(&base),
            &["--steps", "1", "--tr-sigma-max", sigma],
        ));
        (out, text)
    };
    let (wide, text) = tune_at("wide", "100");
    assert!(!text.contains("warning"), "{text}");
    // The structure a frame keeps at t = 1, |x0|^2 / sigma^2 of the centred
    // CA atoms, is recorded, and warned about when large.
    let pdb = std::fs::read_to_string(dir.path().join("frag.pdb")).unwrap();
    let ca: Vec<[f64; 3]> = pdb
        .lines()
        .filter(|l| l.starts_with("ATOM") && &l[12..16] == " CA ")
        .map(|l| [30, 38, 46].map(|c| l[c..c + 8].trim().parse::<f64>().unwrap()))
        .collect();
    assert_eq!(ca.len(), 20);
    let mean: [f64; 3] = [0, 1, 2].map(|k| ca.iter().map(|a| a[k]).sum::<f64>() / 20.0);
    let x0_sq: f64 = ca
        .iter()
        .map(|a| (0..3).map(|k| (a[k] - mean[k]).powi(2)).sum::<f64>())
        .sum();
    let recorded = |run: &Path| {
        read(&run.join("training.json"))["data"]["trajectories"][0]["terminal_signal_nats"]
            .as_f64()
            .unwrap()
    };
    let want = x0_sq / 100.0 / 100.0;
    assert!(
        (recorded(&wide) - want).abs() < 1e-4 * want,
        "{} vs {want}",
        recorded(&wide)
    );
    let (narrow, text) = tune_at("narrow", "3");
    let want = x0_sq / 9.0;
    assert!(want > 10.0, "{want}");
    assert!((recorded(&narrow) - want).abs() < 1e-4 * want);
    let line = format!(
        "at tr_sigma_max 3 Å its training frames keep {want:.1} nats of structure at t = 1"
    );
    assert!(text.contains("warning: ") && text.contains(&line), "{text}");
    let wider = (3.0 * (want / 1.5).sqrt()).ceil();
    assert!(
        text.contains(&format!("--tr-sigma-max {wider:.0} leaves 1.5 nats")),
        "{text}"
    );
    let cfg = read(&wide.join("config.json"));
    assert_eq!(cfg["tr_sigma_max"], 100.0);
    assert!(cfg.get("chiral_features").is_none());
    let summary = read(&wide.join("training.json"));
    assert_eq!(
        summary["init"]["changed"]["tr_sigma_max"],
        serde_json::json!({"from": 35.0, "to": 100.0}),
        "{}",
        summary["init"]
    );
    let err = digctl_err(&tiny_train(
        s(&data),
        s(&dir.path().join("bad-sigma")),
        &["--steps", "1", "--tr-sigma-max", "0.05"],
    ));
    assert!(err.contains("tr_sigma_min < tr_sigma_max"), "{err}");

    // From scratch it needs three heads for a triple product.
    let err = digctl_err(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&dir.path().join("two-heads")),
        "--size",
        "32,16,2,2,64",
        "--chiral-features",
        "--steps",
        "1",
    ]);
    assert!(
        err.contains("chiral_features needs at least 3 heads") && err.contains("n_heads 2"),
        "{err}"
    );
}

#[test]
fn bad_training_input_is_refused_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (pdb, feats) = fragment(d, 20);
    let out = d.join("out");
    let run = |lines: &[String], extra: &[&str]| {
        let data = manifest(d, lines);
        digctl_err(&tiny_train(
            s(&data),
            s(&out),
            &[&["--steps", "2"], extra].concat(),
        ))
    };
    let line = |traj: &Path, f: &Path| {
        format!(r#"{{"trajectory": "{}", "features": "{}"}}"#, s(traj), s(f))
    };

    // Residue count different from the features' L.
    let err = run(&[line(&adk("closed.pdb"), &feats)], &[]);
    assert!(
        err.contains("closed.pdb") && err.contains("has 214 residues") && err.contains("L = 20"),
        "{err}"
    );

    // A residue without its CA.
    let text = std::fs::read_to_string(&pdb).unwrap();
    let mut dropped = false;
    let no_ca: String = text
        .lines()
        .filter(|l| {
            let drop = !dropped
                && l.starts_with("ATOM")
                && &l[12..16] == " CA "
                && l[22..26].trim() == "5";
            dropped |= drop;
            !drop
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(dropped);
    let bad = d.join("no_ca.pdb");
    std::fs::write(&bad, no_ca).unwrap();
    let err = run(&[line(&bad, &feats)], &[]);
    assert!(
        err.contains("no_ca.pdb") && err.contains("has no CA atom"),
        "{err}"
    );

    // A non-finite coordinate.
    let nan: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 10 && l.starts_with("ATOM") {
                format!("{}{:>8}{}\n", &l[..30], "nan", &l[38..])
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let bad = d.join("nan.pdb");
    std::fs::write(&bad, nan).unwrap();
    let err = run(&[line(&bad, &feats)], &[]);
    assert!(
        err.contains("nan.pdb") && err.contains("non-finite coordinate"),
        "{err}"
    );

    // A DCD without its topology.
    let err = run(&[line(&d.join("x.dcd"), &feats)], &[]);
    assert!(
        err.contains("x.dcd") && err.contains("needs a topology"),
        "{err}"
    );

    // Unknown manifest keys and non-positive weights name the line.
    let err = run(
        &[format!(
            r#"{{"trajectory": "{}", "feature": "{}"}}"#,
            s(&pdb),
            s(&feats)
        )],
        &[],
    );
    assert!(
        err.contains("line 1") && err.contains("unknown field `feature`"),
        "{err}"
    );
    let err = run(
        &[format!(
            r#"{{"trajectory": "{}", "features": "{}", "weight": 0}}"#,
            s(&pdb),
            s(&feats)
        )],
        &[],
    );
    assert!(err.contains("weight must be a positive number"), "{err}");

    // An odd batch size.
    let err = run(&[line(&pdb, &feats)], &["--batch-size", "3"]);
    assert!(err.contains("--batch-size must be even"), "{err}");

    // An exact-target threshold outside the diffusion times.
    let err = run(&[line(&pdb, &feats)], &["--exact-target-above", "1.5"]);
    assert!(
        err.contains("--exact-target-above must be in [0, 1), got 1.5"),
        "{err}"
    );

    // Nothing half-written: no failed run left a model directory behind.
    assert!(!out.join("config.json").exists());
    assert!(!out.join("checkpoint").exists());
}

#[test]
fn synthetic_features_are_deterministic_labelled_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.npz"), dir.path().join("b.npz"));
    let fasta = adk("adk.fasta");
    digctl_ok(&["features", "synth", "--fasta", s(&fasta), "--out", s(&a)]);
    digctl_ok(&["features", "synth", "--fasta", s(&fasta), "--out", s(&b)]);
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same bytes twice"
    );
    let text = python(
        "import sys, numpy as np\n\
         d = np.load(sys.argv[1])\n\
         print(d['single'].shape, d['pair'].shape, str(d['sequence'])[:10], 'NOT AlphaFold' in str(d['synthetic']))\n\
         s = d['single']; p = d['pair']\n\
         print(int(s[0, :21].argmax()), int(p[3, 5].argmax()), float(s[:, :21].sum()), float(p.sum()))",
        &[&a],
    );
    // M is residue 0 (one-hot index 10 in ACDEFGHIKLMNPQRSTVWY); j - i = 2 is bin 65.
    assert_eq!(
        text.trim(),
        "(214, 384) (214, 214, 128) MRIILLGAPG True\n10 65 214.0 45796.0",
        "{text}"
    );
    let err = digctl_err(&["features", "synth", "--sequence", "MKB1", "--out", s(&a)]);
    assert!(err.contains("residue 3") && err.contains("'B'"), "{err}");
}
