//! End-to-end tests: they run the real `distill` binary on configs/tiny.toml
//! and check what a user would check: the files it writes, that checkpoints
//! reload, that runs are reproducible, and that bad input is a clear error.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_distill"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    repo().join("configs/tiny.toml")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the distill binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "distill panicked:\n{stderr}");
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "distill failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs distill expecting it to fail with an error (an exit code of `distill --help`'s
/// table, not a signal or a panic); returns stderr.
fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    let code = out.status.code();
    assert!(
        matches!(code, Some(1..=6)),
        "expected an error exit (1 to 6), got {:?}; stdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Runs distill expecting exit code `code` (`distill::error::exit`); returns stderr.
fn fails_with(code: u8, cmd: &mut Command) -> String {
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(i32::from(code)), "{stderr}");
    stderr
}

/// Runs `cfg` as run `name` under `out_dir`; the results land in `out_dir/name`.
fn run_variant(cfg: &Path, out_dir: &Path, name: &str) {
    ok(bin()
        .arg("--config")
        .arg(cfg)
        .arg("--out-dir")
        .arg(out_dir)
        .arg("--name")
        .arg(name));
}

fn tiny_run(out_dir: &Path) -> PathBuf {
    ok(bin().arg("--config").arg(tiny()).arg("--out-dir").arg(out_dir));
    out_dir.join("tiny")
}

#[test]
fn tiny_pipeline_writes_reloadable_checkpoints_ledger_and_report_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let run_a = tiny_run(&tmp.path().join("a"));

    for stage in ["teacher", "student", "baseline"] {
        let dir = run_a.join(stage);
        for f in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "distill.toml",
            "trainer_state.json",
            "optimizer.safetensors",
        ] {
            assert!(dir.join(f).is_file(), "{}/{f} missing", dir.display());
        }
        let out = ok(bin().arg("eval").arg("--checkpoint").arg(&dir));
        assert!(
            out.contains("held-out loss:") && out.contains("held-out accuracy:"),
            "{out}"
        );
    }

    // The ledger has one record per stage, and cost.json totals them.
    let ledger = std::fs::read_to_string(run_a.join("ledger.jsonl")).unwrap();
    let stages: Vec<serde_json::Value> = ledger.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = stages.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(names, ["prepare", "teacher", "student", "baseline", "eval"]);
    for s in &stages[1..] {
        assert!(s["wall_seconds"].as_f64().unwrap() > 0.0);
        assert!(s["tokens"].as_u64().unwrap() > 0, "{s}");
        assert!(s["flops"].as_f64().unwrap() > 0.0, "{s}");
        assert_eq!(s["device_kind"], "cpu");
    }
    assert!(
        stages[2]["teacher_flops"].as_f64().unwrap() > 0.0,
        "the KD stage counts the teacher's forward"
    );
    assert_eq!(
        stages[3]["teacher_flops"].as_f64().unwrap(),
        0.0,
        "the baseline has no teacher"
    );
    let cost: serde_json::Value = serde_json::from_slice(&std::fs::read(run_a.join("cost.json")).unwrap()).unwrap();
    let sum: f64 = stages.iter().map(|s| s["dollars"].as_f64().unwrap()).sum();
    assert!((cost["total_dollars"].as_f64().unwrap() - sum).abs() < 1e-12);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(run_a.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["models"].as_array().unwrap().len(), 3);
    // MFU against the measured CPU peak, per-step metrics, charts.
    for s in &stages[1..] {
        let mfu = s["mfu"].as_f64().unwrap();
        assert!(mfu > 0.0 && mfu < 1.0, "{s}");
        assert!(s["peak_flops_per_second"].as_f64().unwrap() > 1e9);
    }
    let metrics = std::fs::read_to_string(run_a.join("metrics/student.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 30, "one line per step");
    for key in [
        "step",
        "loss",
        "ce",
        "kd",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "dollars",
    ] {
        assert!(rows[0].get(key).is_some(), "metrics lack {key}: {}", rows[0]);
    }
    assert!(rows[29]["dollars"].as_f64().unwrap() > rows[0]["dollars"].as_f64().unwrap());
    for svg in ["loss.svg", "cost.svg"] {
        let text = std::fs::read_to_string(run_a.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "{svg}");
        for stage in ["teacher", "student", "baseline"] {
            assert!(text.contains(stage), "{svg} lacks the {stage} series");
        }
    }
    std::fs::remove_file(run_a.join("report.md")).unwrap();
    let out = ok(bin().arg("report").arg(&run_a));
    assert!(out.contains("MFU") && run_a.join("report.md").is_file(), "{out}");
    // A finished run scales to another size and device.
    let out = ok(bin()
        .args([
            "cost", "--params", "1.5e9", "--tokens", "1e10", "--device", "H100", "--count", "64", "--from",
        ])
        .arg(&run_a));
    for stage in ["teacher", "student", "baseline", "total"] {
        assert!(out.contains(stage), "{out}");
    }

    // Same config and seed: bitwise-identical weights.
    let run_b = tiny_run(&tmp.path().join("b"));
    for stage in ["teacher", "student", "baseline"] {
        let a = std::fs::read(run_a.join(stage).join("model.safetensors")).unwrap();
        let b = std::fs::read(run_b.join(stage).join("model.safetensors")).unwrap();
        assert!(a == b, "{stage} weights differ between two runs with the same seed");
    }
    // The distilled student and the baseline really differ (the teacher mattered).
    let s = std::fs::read(run_a.join("student/model.safetensors")).unwrap();
    let b = std::fs::read(run_a.join("baseline/model.safetensors")).unwrap();
    assert_ne!(s, b);

    // generate loads a checkpoint and continues a prompt.
    let out = ok(bin()
        .args(["generate", "--max-new-tokens", "8", "--prompt", "Ava has 3 apples."])
        .arg("--checkpoint")
        .arg(run_a.join("teacher")));
    assert!(out.starts_with("Ava has 3 apples."), "{out}");

    // An existing run directory is never overwritten without --force.
    let before = std::fs::read(run_a.join("student/model.safetensors")).unwrap();
    let err = fails(
        bin()
            .arg("--config")
            .arg(tiny())
            .arg("--out-dir")
            .arg(tmp.path().join("a")),
    );
    assert!(err.contains("--force") && err.contains("already exists"), "{err}");
    assert_eq!(before, std::fs::read(run_a.join("student/model.safetensors")).unwrap());

    // A teacher loaded from a checkpoint; a tokenizer of another size is a clear error.
    let cfg = tmp.path().join("from_teacher.toml");
    let base = std::fs::read_to_string(tiny()).unwrap();
    let with_teacher = base.replace(
        "[teacher.model]",
        &format!(
            "[teacher]\ncheckpoint = {:?}\n\n[teacher.model]",
            run_a.join("teacher").to_str().unwrap()
        ),
    );
    std::fs::write(&cfg, &with_teacher).unwrap();
    ok(bin()
        .arg("--config")
        .arg(&cfg)
        .arg("--out-dir")
        .arg(tmp.path().join("c")));
    let c_student = std::fs::read(tmp.path().join("c/tiny/student/model.safetensors")).unwrap();
    assert_eq!(c_student, s, "distilling from the saved teacher gives the same student");

    let other_tok = tmp.path().join("other_tokenizer.json");
    let small = base
        .replace("vocab_size = 320", "vocab_size = 300")
        .replace("name = \"tiny\"", "name = \"small_vocab\"");
    let small_cfg = tmp.path().join("small_vocab.toml");
    std::fs::write(&small_cfg, small).unwrap();
    ok(bin()
        .arg("--config")
        .arg(&small_cfg)
        .arg("--out-dir")
        .arg(tmp.path().join("d")));
    std::fs::copy(tmp.path().join("d/small_vocab/tokenizer.json"), &other_tok).unwrap();
    let mismatch = with_teacher.replace(
        "[tokenizer]",
        &format!("[tokenizer]\npath = {:?}", other_tok.to_str().unwrap()),
    );
    std::fs::write(&cfg, mismatch).unwrap();
    let err = fails(
        bin()
            .arg("--config")
            .arg(&cfg)
            .arg("--out-dir")
            .arg(tmp.path().join("e")),
    );
    assert!(err.contains("vocabulary mismatch"), "{err}");
}

#[test]
fn user_jsonl_and_text_data_train() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    let lines: String = (0..40)
        .map(|i| {
            format!(
                "{{\"prompt\": \"What is {i} plus 1?\\n\", \"completion\": \"{i} + 1 = {}\\n#### {}\"}}\n",
                i + 1,
                i + 1
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let text = tmp.path().join("corpus.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog\n".repeat(200)).unwrap();
    let base = std::fs::read_to_string(tiny()).unwrap();
    for (source, path) in [("jsonl", &data), ("text", &text)] {
        let cfg = tmp.path().join(format!("{source}.toml"));
        let body = base
            .replace(
                "source = \"arithmetic\"",
                &format!("source = \"{source}\"\npath = {:?}", path.to_str().unwrap()),
            )
            .replace("steps = 30", "steps = 4");
        std::fs::write(&cfg, body).unwrap();
        run_variant(&cfg, tmp.path(), source);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join(source).join("report.json")).unwrap()).unwrap();
        let student = &report["models"][1];
        assert!(student["eval_loss"].as_f64().unwrap() > 0.0);
        // JSONL completions end in `#### N`, so they are verified; text has no answers.
        assert_eq!(student["accuracy"].is_null(), source == "text", "{student}");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");

    use distill::error::exit;
    std::fs::write(&cfg, "[student.train]\nlearning_rate = 0.1\n").unwrap();
    let err = fails_with(exit::USAGE, bin().arg("--config").arg(&cfg));
    assert!(err.contains("bad.toml") && err.contains("learning_rate"), "{err}");

    std::fs::write(&cfg, "[student.train]\nsteps = -3\n").unwrap();
    let err = fails(bin().arg("--config").arg(&cfg));
    assert!(err.contains("bad.toml") && err.contains("steps"), "{err}");

    std::fs::write(&cfg, "[distill]\ntemperature = 0.0\n").unwrap();
    let err = fails(bin().arg("--config").arg(&cfg));
    assert!(err.contains("distill.temperature"), "{err}");

    let err = fails_with(exit::USAGE, bin().arg("--config").arg(tmp.path().join("nope.toml")));
    assert!(err.contains("nope.toml"), "{err}");

    std::fs::write(
        &cfg,
        format!(
            "[data]\nsource = \"jsonl\"\npath = {:?}\n",
            tmp.path().join("missing.jsonl")
        ),
    )
    .unwrap();
    let err = fails_with(
        exit::DATA,
        bin().arg("--config").arg(&cfg).arg("--out-dir").arg(tmp.path()),
    );
    assert!(err.contains("missing.jsonl"), "{err}");

    let err = fails_with(
        exit::CHECKPOINT,
        bin()
            .arg("eval")
            .arg("--checkpoint")
            .arg(tmp.path().join("no_such_checkpoint")),
    );
    assert!(err.contains("no_such_checkpoint"), "{err}");

    // A run name cannot put the run directory (which --force replaces) outside --out-dir.
    for name in ["../escape", "..", "a/b", "/abs"] {
        let err = fails_with(
            exit::USAGE,
            bin()
                .arg("--config")
                .arg(tiny())
                .arg("--out-dir")
                .arg(tmp.path())
                .arg("--name")
                .arg(name),
        );
        assert!(
            err.contains("plain folder name") && err.contains("--out-dir"),
            "{name}: {err}"
        );
    }
    std::fs::write(&cfg, "[run]\nname = \"../up\"\n").unwrap();
    let err = fails(bin().arg("--config").arg(&cfg));
    assert!(err.contains("run.name"), "{err}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_request_without_cuda_build_is_refused_not_run_on_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails_with(
        distill::error::exit::DEVICE,
        bin()
            .arg("--config")
            .arg(tiny())
            .arg("--device")
            .arg("cuda")
            .arg("--out-dir")
            .arg(tmp.path()),
    );
    assert!(err.contains("--features cuda"), "{err}");
    assert!(
        !tmp.path().join("tiny").exists(),
        "nothing may run after a refused device"
    );
}

/// A `cuda` build on a machine without a GPU (CI, with scripts/cuda-stubs.py's libcuda,
/// or a driver that sees no GPU): `--device cuda` exits 5 naming the missing driver or
/// device and the way out, and nothing runs on the CPU instead. Skipped where a GPU
/// opens (scripts/gpu-check.sh runs the tiny config there).
#[cfg(feature = "cuda")]
#[test]
fn cuda_request_without_a_gpu_is_refused_not_run_on_cpu() {
    if let Ok(dev) = distill::device::open(distill::config::DeviceName::Cuda(0)) {
        eprintln!("skipped cuda_request_without_a_gpu_is_refused_not_run_on_cpu: a GPU is present ({dev:?})");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for device in ["cuda", "cuda:0"] {
        let err = fails_with(
            distill::error::exit::DEVICE,
            bin()
                .arg("--config")
                .arg(tiny())
                .arg("--device")
                .arg(device)
                .arg("--out-dir")
                .arg(tmp.path()),
        );
        assert!(
            err.contains("no NVIDIA driver") || err.contains("no CUDA device"),
            "{err}"
        );
        assert!(err.contains("--device cpu"), "{err}");
        assert!(
            !tmp.path().join("tiny").exists(),
            "nothing may run after a refused device"
        );
    }
}

/// The bf16 path on a GPU: configs/tiny.toml through the binary on cuda:0 with
/// `--dtype bf16` (bf16 matmuls, f32 master weights): it trains (the loss falls), its
/// checkpoints are f32 and reload, the report names the dtype and the ledger the GPU.
/// Compiled in every `cuda` build; skipped, with a message, where no GPU is present
/// (scripts/gpu-check.sh runs it on one).
#[cfg(feature = "cuda")]
#[test]
fn cuda_bf16_training_runs_on_the_gpu() {
    if let Err(e) = distill::device::open(distill::config::DeviceName::Cuda(0)) {
        eprintln!("skipped cuda_bf16_training_runs_on_the_gpu: no CUDA device ({e})");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    ok(bin()
        .arg("--config")
        .arg(tiny())
        .args(["--device", "cuda", "--dtype", "bf16", "--out-dir"])
        .arg(tmp.path()));
    let run = tmp.path().join("tiny");
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains("compute dtype BF16"), "{report}");
    let cost: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("cost.json")).unwrap()).unwrap();
    let stages = cost["stages"].as_array().unwrap();
    assert!(!stages.is_empty());
    for s in stages {
        assert_eq!(s["device_kind"], "cuda", "{s}");
        assert!(s["device_name"].as_str().unwrap().contains("NVIDIA"), "{s}");
    }
    for stage in ["teacher", "student"] {
        let w = distill::candle::safetensors::load(
            run.join(stage).join("model.safetensors"),
            &distill::candle::Device::Cpu,
        )
        .unwrap();
        assert!(w.values().all(|t| t.dtype() == distill::candle::DType::F32));
        let losses: Vec<f64> = std::fs::read_to_string(run.join(format!("metrics/{stage}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert!(losses.iter().all(|l| l.is_finite()), "{stage}: {losses:?}");
        assert!(
            losses[losses.len() - 1] < 0.8 * losses[0],
            "{stage}: the loss did not fall in bf16 on the GPU: {losses:?}"
        );
    }
}

/// `--dtype bf16` on CPU (the logic the CUDA path shares): matmuls and activations in
/// bf16, the master weights, checkpoints and loss in f32. The run trains (the loss falls),
/// its checkpoints are f32 and reload, the report names the dtype, and it is
/// reproducible; a bad dtype is a clear error.
#[test]
fn bf16_compute_trains_with_f32_master_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let runs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| {
            ok(bin()
                .arg("--config")
                .arg(tiny())
                .args(["--dtype", "bf16", "--out-dir"])
                .arg(tmp.path().join(n)));
            tmp.path().join(n).join("tiny")
        })
        .collect();
    let report = std::fs::read_to_string(runs[0].join("report.md")).unwrap();
    assert!(report.contains("compute dtype BF16"), "{report}");
    for stage in ["teacher", "student"] {
        let w = distill::candle::safetensors::load(
            runs[0].join(stage).join("model.safetensors"),
            &distill::candle::Device::Cpu,
        )
        .unwrap();
        assert!(w.values().all(|t| t.dtype() == distill::candle::DType::F32));
        let again = std::fs::read(runs[1].join(stage).join("model.safetensors")).unwrap();
        assert_eq!(
            std::fs::read(runs[0].join(stage).join("model.safetensors")).unwrap(),
            again,
            "bf16 runs are not reproducible"
        );
        let losses: Vec<f64> = std::fs::read_to_string(runs[0].join(format!("metrics/{stage}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert!(losses.iter().all(|l| l.is_finite()));
        assert!(
            losses[losses.len() - 1] < 0.8 * losses[0],
            "{stage}: the loss did not fall in bf16: {losses:?}"
        );
    }
    let err = fails(
        bin()
            .arg("--config")
            .arg(tiny())
            .args(["--dtype", "fp8", "--out-dir"])
            .arg(tmp.path().join("bad")),
    );
    assert!(err.contains("\"bf16\""), "{err}");
}

/// `[student] init = "both"`: a `prune` stage cuts a student from the trained teacher
/// (depth, then width by activations) and a `student-pruned` stage distils from that
/// start beside the random-init `student`; both have the pruned architecture, reload, and
/// the ledger bills the prune stage. Bad pruning settings are config errors naming the key.
#[test]
fn a_student_pruned_from_the_teacher_trains_beside_a_random_one() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(tiny()).unwrap() + "\n[student]\ninit = \"both\"\ncalibration_examples = 8\n";
    let cfg = tmp.path().join("pruned.toml");
    std::fs::write(&cfg, &text).unwrap();
    run_variant(&cfg, tmp.path(), "p");
    let run_dir = tmp.path().join("p");
    let ledger = std::fs::read_to_string(run_dir.join("ledger.jsonl")).unwrap();
    let stages: Vec<String> = ledger
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["stage"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        stages,
        [
            "prepare",
            "teacher",
            "prune",
            "student",
            "student-pruned",
            "baseline",
            "eval"
        ]
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("report.json")).unwrap()).unwrap();
    let params: Vec<u64> = ["student", "student-pruned", "baseline"]
        .iter()
        .map(|n| {
            let m = report["models"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == *n)
                .unwrap();
            assert!(m["eval_loss"].as_f64().unwrap().is_finite());
            m["params"].as_u64().unwrap()
        })
        .collect();
    assert!(params.iter().all(|p| *p == params[0]), "one architecture: {params:?}");
    let (model, _) =
        distill::train::checkpoint::load(&run_dir.join("student-pruned"), &distill::candle::Device::Cpu).unwrap();
    assert_eq!((model.cfg.hidden_size, model.cfg.num_hidden_layers), (32, 1));

    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        text.replace("init = \"both\"", "init = \"both\"\nprune_layers = [0, 1]"),
    )
    .unwrap();
    let err = fails(bin().arg("--config").arg(&bad).arg("--out-dir").arg(tmp.path()));
    assert!(err.contains("student.prune_layers"), "{err}");

    // A width the teacher cannot be cut to (hidden 40 is not 2 heads x the teacher's head
    // size 16) is refused before the teacher trains: no teacher checkpoint is written.
    let unreachable = tmp.path().join("unreachable.toml");
    std::fs::write(&unreachable, text.replace("hidden_size = 32\n", "hidden_size = 40\n")).unwrap();
    assert_ne!(
        std::fs::read_to_string(&unreachable).unwrap(),
        text,
        "the test edits the student"
    );
    let out = tmp.path().join("unreachable-out");
    let err = fails(bin().arg("--config").arg(&unreachable).arg("--out-dir").arg(&out));
    assert!(err.contains("hidden_size") && err.contains("[student.model]"), "{err}");
    assert!(
        !out.join("tiny/teacher").exists(),
        "the teacher trained before the error"
    );
}

#[test]
fn help_documents_every_subcommand() {
    let out = ok(bin().arg("--help"));
    for word in [
        "run", "resume", "eval", "generate", "merge", "cost", "peak", "report", "--config", "--device", "--force",
    ] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
}

#[test]
fn every_divergence_trains_a_student() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(tiny()).unwrap();
    for loss in [
        "forward_kl",
        "reverse_kl",
        "jsd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "tvd",
    ] {
        let cfg = tmp.path().join(format!("{loss}.toml"));
        let body = base
            .replace("temperature = 2.0", &format!("temperature = 2.0\nloss = \"{loss}\""))
            .replace("steps = 30", "steps = 3")
            .replace("examples = 16", "examples = 2");
        std::fs::write(&cfg, body).unwrap();
        run_variant(&cfg, tmp.path(), loss);
        let ledger = std::fs::read_to_string(tmp.path().join(loss).join("ledger.jsonl")).unwrap();
        assert!(ledger.contains("\"stage\":\"student\""), "{loss}: {ledger}");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join(loss).join("student/trainer_state.json")).unwrap())
                .unwrap();
        assert_eq!(state["step"], 3);
        assert!(state["last_loss"].as_f64().unwrap().is_finite());
    }
}

/// A top-k teacher online, and the offline logit cache: the `teacher-logits` stage writes
/// shards and an index, the student trains from them without running the teacher, and a
/// resumed run reuses the cache instead of writing it again.
#[test]
fn top_k_teacher_and_offline_logit_cache_train_a_student() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(tiny())
        .unwrap()
        .replace("steps = 30", "steps = 3")
        .replace("examples = 16", "examples = 2");
    for (name, extra) in [
        ("topk-online", "top_k = 8\nloss = \"reverse_kl\""),
        ("topk-cache", "top_k = 8\nlogit_cache = true"),
        ("head-cache", "top_k = 8\nlogit_cache = true\nfused_head = true"),
        ("full-online", ""),
        ("head-online", "fused_head = true"),
    ] {
        let cfg = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            base.replace("temperature = 2.0", &format!("temperature = 2.0\n{extra}")),
        )
        .unwrap();
        run_variant(&cfg, tmp.path(), name);
        let run_dir = tmp.path().join(name);
        let ledger = std::fs::read_to_string(run_dir.join("ledger.jsonl")).unwrap();
        let stage = |n: &str| -> serde_json::Value {
            let line = ledger
                .lines()
                .find(|l| l.contains(&format!("\"stage\":\"{n}\"")))
                .unwrap_or_else(|| panic!("{name}: no {n} in {ledger}"));
            serde_json::from_str(line).unwrap()
        };
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run_dir.join("student/trainer_state.json")).unwrap()).unwrap();
        assert_eq!(state["step"], 3, "{name}");
        assert!(state["last_loss"].as_f64().unwrap().is_finite(), "{name}");
        let report = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
        if let Some(twin) = name.strip_prefix("head-") {
            // The fused head computes the same loss chunk by chunk: the same run to rounding.
            let twin = if twin == "cache" { "topk-cache" } else { "full-online" };
            let plain: serde_json::Value = serde_json::from_slice(
                &std::fs::read(tmp.path().join(twin).join("student/trainer_state.json")).unwrap(),
            )
            .unwrap();
            let (a, b) = (
                state["last_loss"].as_f64().unwrap(),
                plain["last_loss"].as_f64().unwrap(),
            );
            assert!((a - b).abs() <= 1e-3 * b.abs(), "fused head {a} vs logits {b}");
        }
        if name != "topk-cache" && name != "head-cache" {
            assert!(stage("student")["teacher_flops"].as_f64().unwrap() > 0.0);
            assert!(!run_dir.join("logit-cache").exists());
            continue;
        }
        // The cache stage paid for the teacher's passes; the student ran none.
        assert!(stage("teacher-logits")["flops"].as_f64().unwrap() > 0.0);
        assert_eq!(stage("student")["teacher_flops"].as_f64().unwrap(), 0.0);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run_dir.join("logit-cache/index.json")).unwrap()).unwrap();
        assert_eq!(index["k"], 8);
        assert!(run_dir.join("logit-cache/shard-00000.safetensors").is_file());
        assert!(
            report.contains("Offline logit cache") && report.contains("bytes per token"),
            "{report}"
        );
        let again = run(bin().arg("resume").arg(&run_dir));
        let said = String::from_utf8_lossy(&again.stderr);
        assert!(
            again.status.success() && said.contains("teacher-logits: complete"),
            "{said}"
        );
    }
}

/// A teacher from the Hugging Face Hub by id: resolved offline from a Hub cache folder
/// (`HF_HOME`, `HF_HUB_OFFLINE=1`) holding a sharded checkpoint, it gives the same
/// held-out figures as the folder it was made from.
#[test]
fn teacher_resolves_from_a_hub_cache_with_sharded_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(tiny())
        .unwrap()
        .replace("steps = 30", "steps = 3")
        .replace("examples = 16", "examples = 2");
    let cfg = tmp.path().join("src.toml");
    std::fs::write(&cfg, &base).unwrap();
    run_variant(&cfg, tmp.path(), "src");
    let teacher = tmp.path().join("src/teacher");

    // The Hub cache layout: refs/main -> commit, snapshots/<commit>/ with two shards.
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let snap = tmp
        .path()
        .join("hf/hub/models--acme--tiny-teacher/snapshots")
        .join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(tmp.path().join("hf/hub/models--acme--tiny-teacher/refs")).unwrap();
    std::fs::write(tmp.path().join("hf/hub/models--acme--tiny-teacher/refs/main"), commit).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(teacher.join(f), snap.join(f)).unwrap();
    }
    let tensors =
        distill::candle::safetensors::load(teacher.join("model.safetensors"), &distill::candle::Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (mut weight_map, mut shards) = (serde_json::Map::new(), [Vec::new(), Vec::new()]);
    for (i, n) in names.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert((*n).clone(), file.into());
        shards[i % 2].push(((*n).clone(), tensors[*n].clone()));
    }
    for (i, shard) in shards.iter().enumerate() {
        let map: std::collections::HashMap<String, distill::candle::Tensor> = shard.iter().cloned().collect();
        distill::candle::safetensors::save(&map, snap.join(format!("model-0000{}-of-00002.safetensors", i + 1)))
            .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(snap.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let cfg = tmp.path().join("hub.toml");
    std::fs::write(
        &cfg,
        base.replace(
            "[teacher.model]",
            "[teacher]\nhub = \"acme/tiny-teacher\"\n\n[teacher.model]",
        ),
    )
    .unwrap();
    let out = run(bin()
        .arg("--config")
        .arg(&cfg)
        .arg("--out-dir")
        .arg(tmp.path())
        .arg("--name")
        .arg("hub")
        .env("HF_HOME", tmp.path().join("hf"))
        .env("HF_HUB_OFFLINE", "1"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("hub model acme/tiny-teacher@main"), "{err}");
    let report = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(tmp.path().join(name).join("report.json")).unwrap()).unwrap()
    };
    assert_eq!(
        report("hub")["models"][0]["eval_loss"],
        report("src")["models"][0]["eval_loss"]
    );

    // Offline, an id the cache lacks is an error that names the cache and the ways out.
    std::fs::write(
        &cfg,
        base.replace("[teacher.model]", "[teacher]\nhub = \"acme/absent\"\n\n[teacher.model]"),
    )
    .unwrap();
    let err = fails(
        bin()
            .arg("--config")
            .arg(&cfg)
            .arg("--out-dir")
            .arg(tmp.path())
            .arg("--name")
            .arg("absent")
            .env("HF_HOME", tmp.path().join("hf"))
            .env("HF_HUB_OFFLINE", "1"),
    );
    assert!(
        err.contains("models--acme--absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

/// The DeepSeek-R1 recipe on the tiny config: teacher traces with rejection
/// sampling, the four students, and sharded generation that merges into the
/// single-process file byte for byte.
#[test]
fn r1_recipe_runs_and_sharded_generation_merges_byte_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("r1.toml");
    let body = std::fs::read_to_string(tiny()).unwrap().replace("name = \"tiny\"", "name = \"r1\"")
        .replace("[teacher.train]\nsteps = 30", "[teacher.train]\nsteps = 80")
        + "\n[student]\ntrain_examples = 96\n\n[traces]\nenabled = true\nsamples = 4\ntemperature = 1.0\nmax_new_tokens = 40\n";
    std::fs::write(&cfg, body).unwrap();
    run_variant(&cfg, tmp.path(), "r1");
    let run_dir = tmp.path().join("r1");

    // One record per sample, each with the verifier's verdict; kept ones are correct.
    let traces: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("traces.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(traces.len(), 96 * 4);
    for t in &traces {
        for key in [
            "prompt",
            "completion",
            "verdict",
            "teacher",
            "temperature",
            "top_p",
            "seed",
        ] {
            assert!(t.get(key).is_some(), "trace record lacks {key}: {t}");
        }
        if t["kept"] == true {
            assert_eq!(t["verdict"], "correct");
            assert_eq!(t["answer"], t["predicted"]);
        }
    }
    assert!(
        traces.iter().any(|t| t["kept"] == true),
        "the tiny teacher solved nothing"
    );
    let ledger = std::fs::read_to_string(run_dir.join("ledger.jsonl")).unwrap();
    let names: Vec<String> = ledger
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["stage"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "prepare",
            "teacher",
            "traces",
            "student",
            "student-kd",
            "baseline",
            "oracle",
            "eval"
        ]
    );
    let report = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(
        report.contains("Rejection sampling") && report.contains("SFT data creation"),
        "{report}"
    );
    for stage in ["student", "student-kd", "baseline", "oracle"] {
        ok(bin().arg("eval").arg("--checkpoint").arg(run_dir.join(stage)));
    }

    // Sharded generation outside the pipeline: 2 and 3 shards merge into the
    // single-process file byte for byte.
    let prompts = tmp.path().join("prompts.jsonl");
    let lines: String = (0..14)
        .map(|i| format!("{{\"prompt\":\"Ava has {i} apples. Then Ava buys 2 more. How many apples does Ava have now?\\n\",\"answer\":{}}}\n", i + 2))
        .chain(["{\"prompt\":\"Sam has 1 coins. Then Sam doubles the coins. How many coins does Sam have now?\\n\"}\n".to_string()])
        .collect();
    std::fs::write(&prompts, lines).unwrap();
    let gen = |out: &Path, shard: Option<&str>| {
        let mut cmd = bin();
        cmd.args([
            "generate",
            "--samples",
            "3",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            "11",
        ])
        .args(["--batch-size", "6", "--max-new-tokens", "24"])
        .arg("--checkpoint")
        .arg(run_dir.join("teacher"))
        .arg("--input")
        .arg(&prompts)
        .arg("--out")
        .arg(out);
        if let Some(s) = shard {
            cmd.args(["--shard", s]);
        }
        ok(&mut cmd);
    };
    let whole = tmp.path().join("whole.jsonl");
    gen(&whole, None);
    let whole_bytes = std::fs::read(&whole).unwrap();
    // 14 prompts with answers x 3 samples; the prompt without an answer is skipped.
    assert_eq!(String::from_utf8_lossy(&whole_bytes).lines().count(), 42);
    for n in [2, 3] {
        let mut shards = Vec::new();
        for i in (0..n).rev() {
            let p = tmp.path().join(format!("shard-{i}-of-{n}.jsonl"));
            gen(&p, Some(&format!("{i}/{n}")));
            assert!(std::fs::read(&p).unwrap().len() < whole_bytes.len());
            shards.push(p);
        }
        let merged = tmp.path().join(format!("merged-{n}.jsonl"));
        ok(bin()
            .arg("merge")
            .arg("--out")
            .arg(&merged)
            .arg("--input")
            .arg(&prompts)
            .args(&shards));
        assert!(
            std::fs::read(&merged).unwrap() == whole_bytes,
            "{n} shards do not merge into the whole"
        );
        // A missing shard is an error when the prompts are given, and a shard given twice always is.
        let err = fails(
            bin()
                .arg("merge")
                .arg("--out")
                .arg(tmp.path().join("x.jsonl"))
                .arg("--input")
                .arg(&prompts)
                .args(&shards[1..]),
        );
        assert!(err.contains("shard"), "{err}");
        let err = fails(
            bin()
                .arg("merge")
                .arg("--out")
                .arg(tmp.path().join("y.jsonl"))
                .args([&shards[0], &shards[0]]),
        );
        assert!(err.contains("twice"), "{err}");
    }
    let err = fails(bin().arg("merge").arg("--out").arg(&whole).arg(&whole));
    assert!(err.contains("--force"), "{err}");
    let err = fails(
        bin()
            .args(["generate", "--shard", "2/2", "--out"])
            .arg(tmp.path().join("z.jsonl"))
            .arg("--checkpoint")
            .arg(run_dir.join("teacher"))
            .arg("--input")
            .arg(&prompts),
    );
    assert!(err.contains("0 <= i < n"), "{err}");
}

/// The tiny config as the R1 recipe (every stage kind: teacher, traces, four
/// students, eval), with a checkpoint every 3 steps.
fn r1_kill_config(dir: &Path) -> PathBuf {
    let cfg = dir.join("kill.toml");
    let body = std::fs::read_to_string(tiny())
        .unwrap()
        .replace("name = \"tiny\"", "name = \"kill\"")
        .replace("[teacher.train]\nsteps = 30", "[teacher.train]\nsteps = 80\nsave_every = 3")
        .replace("[student.train]\nsteps = 30", "[student.train]\nsteps = 30\nsave_every = 3")
        + "\n[student]\ntrain_examples = 64\n\n[traces]\nenabled = true\nsamples = 2\ntemperature = 1.0\nmax_new_tokens = 40\n"
        + ONPOLICY_AND_RL;
    std::fs::write(&cfg, body).unwrap();
    cfg
}

/// A teacher on int8 matmul weights writes the traces: the records name it with its
/// weights, the report says so, and `distill generate` / `distill eval` take the flag.
#[test]
fn an_int8_teacher_writes_the_traces_and_the_report_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("int8.toml");
    let body =
        std::fs::read_to_string(tiny())
            .unwrap()
            .replacen("intermediate_size = 172", "intermediate_size = 192", 1)
            + "\n[teacher]\nmatmul_weights = \"int8\"\n\n[traces]\nenabled = true\nsamples = 2\nmax_new_tokens = 24\n";
    std::fs::write(&cfg, body).unwrap();
    run_variant(&cfg, tmp.path(), "q");
    let run = tmp.path().join("q");
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains("int8 matmul weights"), "{report}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["teacher_weights"], "int8");
    let traces = std::fs::read_to_string(run.join("traces.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(traces.lines().next().unwrap()).unwrap();
    assert!(first["teacher"].as_str().unwrap().ends_with("+int8"), "{first}");
    let teacher = run.join("teacher");
    let out = ok(bin()
        .args(["generate", "--prompt", "Tom has 3 apples.", "--max-new-tokens", "8"])
        .args(["--matmul-weights", "int8", "--checkpoint"])
        .arg(&teacher));
    assert!(out.starts_with("Tom has 3 apples."), "{out}");
    let out = ok(bin()
        .args(["eval", "--matmul-weights", "int8", "--checkpoint"])
        .arg(&teacher));
    assert!(out.contains("held-out loss"), "{out}");
    let err = fails(
        bin()
            .args(["eval", "--matmul-weights", "int4", "--checkpoint"])
            .arg(&teacher),
    );
    assert!(err.contains("--matmul-weights"), "{err}");
}

/// Small on-policy and RL stages for the tiny configs, checkpointed every 3 steps; the
/// on-policy stage samples on every training problem, as configs/small.toml does.
const ONPOLICY_AND_RL: &str = "
[onpolicy]
enabled = true
lambda = 0.75
max_new_tokens = 32
prompts = \"train\"

[onpolicy.train]
steps = 9
batch_size = 8
eval_every = 3
save_every = 3

[rl]
enabled = true
group = 4
kl = 0.05
max_new_tokens = 32

[rl.train]
steps = 9
batch_size = 8
eval_every = 3
save_every = 3
";

/// The R1 recipe followed by on-policy distillation and GRPO: both stages train, bill
/// their sampling and scoring apart, checkpoint weights that reload, repeat bitwise, and
/// the report compares every arm with its accuracy curve.
#[test]
fn on_policy_and_rl_stages_train_and_the_report_compares_the_arms() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = r1_kill_config(tmp.path());
    let body = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[eval]\n", "[eval]\ncurve_examples = 8\n");
    std::fs::write(&cfg, body).unwrap();
    run_variant(&cfg, tmp.path(), "a");
    run_variant(&cfg, tmp.path(), "b");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for stage in ["student-onpolicy", "student-rl"] {
        let wa = std::fs::read(a.join(stage).join("model.safetensors")).unwrap();
        assert_eq!(
            wa,
            std::fs::read(b.join(stage).join("model.safetensors")).unwrap(),
            "{stage} is not reproducible"
        );
        let start = if stage == "student-rl" { "baseline" } else { "student" };
        assert_ne!(
            wa,
            std::fs::read(a.join(start).join("model.safetensors")).unwrap(),
            "{stage} did not train"
        );
        let out = ok(bin().arg("eval").arg("--checkpoint").arg(a.join(stage)));
        assert!(out.contains("held-out"), "{out}");
    }
    let ledger = ledger_records(&a);
    for stage in ["student-onpolicy", "student-rl"] {
        let rec = ledger.iter().find(|r| r["stage"] == stage).expect("a ledger line");
        let split = &rec["split"];
        assert!(
            num(split, "sample_seconds") > 0.0 && num(split, "sample_flops") > 0.0,
            "{rec}"
        );
        if stage == "student-onpolicy" {
            assert!(num(split, "score_flops") > 0.0, "the teacher scored nothing: {rec}");
        }
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("report.json")).unwrap()).unwrap();
    let arm = |n: &str| {
        report["arms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(
        arm("student-onpolicy")["stages"],
        serde_json::json!(["teacher", "traces", "student", "student-onpolicy"])
    );
    assert_eq!(
        arm("student-rl")["stages"],
        serde_json::json!(["baseline", "student-rl"])
    );
    assert!(!arm("student-rl")["curve"].as_array().unwrap().is_empty());
    let md = std::fs::read_to_string(a.join("report.md")).unwrap();
    assert!(
        md.contains("Which recipe buys accuracy cheapest") && md.contains("accuracy.svg"),
        "{md}"
    );
    assert!(a.join("accuracy.svg").is_file());
}

/// Every checkpoint directory on disk (final and periodic) passes its
/// checksums and loads; temporary folders of interrupted writes are counted.
fn check_checkpoints_on_disk(run_dir: &Path) -> usize {
    let mut temps = 0;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for top in [run_dir.to_path_buf(), run_dir.join("checkpoints")] {
        let Ok(rd) = std::fs::read_dir(&top) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if !p.is_dir() {
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with('.') {
                temps += 1;
            } else if top.ends_with("checkpoints") {
                for e in std::fs::read_dir(&p).unwrap() {
                    let q = e.unwrap().path();
                    if q.file_name().unwrap().to_string_lossy().starts_with('.') {
                        temps += 1;
                    } else {
                        dirs.push(q);
                    }
                }
            } else if name != "checkpoints" && name != "metrics" {
                dirs.push(p);
            }
        }
    }
    for d in dirs {
        distill::train::checkpoint::verify(&d).unwrap_or_else(|e| panic!("damaged checkpoint on disk: {e}"));
        distill::train::checkpoint::load(&d, &distill::candle::Device::Cpu)
            .unwrap_or_else(|e| panic!("checkpoint does not load: {e}"));
    }
    temps
}

/// Runs `distill resume RUN_DIR` (with `env`, and through bash when `shell` prefixes the
/// command, for `ulimit`); returns the exit status and stderr.
fn resume_with(run_dir: &Path, env: &[(&str, &str)], shell: Option<&str>) -> (std::process::ExitStatus, String) {
    let exe = env!("CARGO_BIN_EXE_distill");
    let mut cmd = match shell {
        Some(prefix) => {
            let mut c = Command::new("bash");
            c.arg("-c")
                .arg(format!("{prefix}; exec \"$0\" resume \"$1\""))
                .arg(exe)
                .arg(run_dir);
            c
        }
        None => {
            let mut c = bin();
            c.arg("resume").arg(run_dir);
            c
        }
    };
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd);
    (out.status, String::from_utf8_lossy(&out.stderr).to_string())
}

/// Crashes half-way through checkpoint writes (`DISTILL_CRASH_IN_WRITE`), and a disk that
/// fills up (a file-size limit, which makes writes fail with EFBIG the way a full disk
/// fails them with ENOSPC, and needs no privileges): each leaves the previous checkpoint
/// intact and loadable, the full disk is a clear error, and the resumed run's weights
/// equal the uninterrupted run's bit for bit.
#[test]
fn crashes_inside_checkpoint_writes_and_a_full_disk_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = r1_kill_config(tmp.path());
    run_variant(&cfg, &tmp.path().join("ref"), "kill");
    let reference = tmp.path().join("ref/kill");
    let out = tmp.path().join("crashed");
    let run_dir = out.join("kill");

    // Crash inside the second teacher optimizer write: step 3 is complete, step 6 half written.
    let first = run(bin()
        .arg("--config")
        .arg(&cfg)
        .arg("--out-dir")
        .arg(&out)
        .env("DISTILL_CRASH_IN_WRITE", "optimizer.safetensors:2"));
    assert!(!first.status.success());
    assert!(String::from_utf8_lossy(&first.stderr).contains("aborting half-way"));
    let step3 = run_dir.join("checkpoints/teacher/step-000003");
    assert!(
        check_checkpoints_on_disk(&run_dir) >= 1,
        "the interrupted write left no temporary folder"
    );
    distill::train::checkpoint::verify(&step3).unwrap();

    // The disk fills up: resuming from step 3, the teacher's optimizer state (about 1 MB)
    // no longer fits (the limit is in KiB), so the step-6 checkpoint fails to write.
    let (status, err) = resume_with(&run_dir, &[], Some("ulimit -f 700; trap '' XFSZ"));
    // A checkpoint that cannot be written exits with the checkpoint code.
    assert_eq!(
        status.code(),
        Some(i32::from(distill::error::exit::CHECKPOINT)),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("step-000006")
            && err.contains("could not be written")
            && err.contains("previous checkpoint is intact"),
        "{err}"
    );
    assert!(err.contains("File too large"), "the OS error is kept: {err}");
    assert_eq!(
        check_checkpoints_on_disk(&run_dir),
        0,
        "a failed write left its temporary folder"
    );
    distill::train::checkpoint::verify(&step3).unwrap();
    assert!(!run_dir.join("checkpoints/teacher/step-000006").exists());

    // More crashes inside writes of later files, each in a resumed process, then an
    // uninterrupted finish. `scripts/kill-test.sh` passes a longer list (DISTILL_CRASH_SPECS).
    let specs = std::env::var("DISTILL_CRASH_SPECS")
        .unwrap_or_else(|_| "model.safetensors:3,trainer_state.json:2,config.json:4".into());
    let mut crashes = 1;
    for spec in specs.split(',').filter(|s| !s.is_empty()) {
        let (status, err) = resume_with(&run_dir, &[("DISTILL_CRASH_IN_WRITE", spec)], None);
        assert!(!err.contains("panicked"), "{spec}: {err}");
        if status.success() {
            break; // the run finished before the N-th write of that file
        }
        assert!(err.contains("aborting half-way"), "{spec}: {err}");
        crashes += 1;
        check_checkpoints_on_disk(&run_dir);
    }
    let (status, err) = resume_with(&run_dir, &[], None);
    assert!(status.success(), "{err}");
    for stage in ["teacher", "student", "student-kd", "baseline", "oracle"] {
        let a = std::fs::read(reference.join(stage).join("model.safetensors")).unwrap();
        let b = std::fs::read(run_dir.join(stage).join("model.safetensors")).unwrap();
        assert!(a == b, "{stage}: resumed weights differ from the uninterrupted run's");
    }
    check_checkpoints_on_disk(&run_dir);
    eprintln!("crash test: {crashes} crashes inside file writes and 1 full disk, all stages bitwise equal");
}

/// Kill -9 at pseudo-random moments, resume each time: the final weights and
/// traces equal an uninterrupted run's byte for byte, every checkpoint on disk
/// stays loadable, and the ledger bills the killed segments. CI runs 5 kill
/// points; `scripts/kill-test.sh` runs more (DISTILL_KILL_POINTS).
#[test]
fn kill_anywhere_and_resume_gives_the_uninterrupted_result() {
    let points: usize = std::env::var("DISTILL_KILL_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = r1_kill_config(tmp.path());
    let t0 = std::time::Instant::now();
    run_variant(&cfg, &tmp.path().join("ref"), "kill");
    let full = t0.elapsed().as_secs_f64();
    let reference = tmp.path().join("ref/kill");

    let out = tmp.path().join("killed");
    let run_dir = out.join("kill");
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let (mut kills, mut temps_seen, mut attempts) = (0, 0, 0);
    loop {
        attempts += 1;
        assert!(attempts < 4 * points + 20, "the run never finished");
        let mut cmd = bin();
        if run_dir.join("config.toml").is_file() {
            cmd.arg("resume").arg(&run_dir);
        } else {
            cmd.arg("--config").arg(&cfg).arg("--out-dir").arg(&out);
            if run_dir.exists() {
                // Killed after making the folder, before writing config.toml:
                // nothing to resume, and starting anew needs --force.
                cmd.arg("--force");
            }
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Kill points spread over the whole run, including checkpoint writes.
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let frac = (rng >> 11) as f64 / (1u64 << 53) as f64;
        // Spaced so that `points` kills fit well inside one run's length, and
        // at least 0.4 s apart, so that resumed segments get past their start-up.
        let at = std::time::Duration::from_secs_f64(0.4 + frac * full / points as f64);
        let start = std::time::Instant::now();
        let mut finished = None;
        while start.elapsed() < at || kills >= points {
            if let Some(status) = child.try_wait().unwrap() {
                finished = Some(status);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        match finished {
            Some(status) => {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert!(status.success(), "a resumed run failed:\n{err}");
                assert!(!err.contains("panicked"), "{err}");
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                if run_dir.is_dir() {
                    temps_seen += check_checkpoints_on_disk(&run_dir);
                }
            }
        }
    }
    assert!(kills >= points, "only {kills} kills landed");
    let stages = [
        "teacher",
        "student",
        "student-kd",
        "baseline",
        "oracle",
        "student-onpolicy",
        "student-rl",
    ];
    for stage in stages {
        let a = std::fs::read(reference.join(stage).join("model.safetensors")).unwrap();
        let b = std::fs::read(run_dir.join(stage).join("model.safetensors")).unwrap();
        assert!(a == b, "{stage}: resumed weights differ from the uninterrupted run's");
    }
    assert_eq!(
        std::fs::read(reference.join("traces.jsonl")).unwrap(),
        std::fs::read(run_dir.join("traces.jsonl")).unwrap()
    );
    check_checkpoints_on_disk(&run_dir);

    // Each stage completed once; killed segments are billed, and the totals add up.
    let ledger: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("ledger.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for stage in stages.iter().chain(&["prepare", "traces", "eval"]) {
        let n = ledger
            .iter()
            .filter(|r| r["stage"] == *stage && r.get("interrupted").is_none())
            .count();
        assert_eq!(n, 1, "{stage} completed {n} times in the ledger");
    }
    let killed = ledger.iter().filter(|r| r.get("interrupted").is_some()).count();
    assert!(
        killed >= 1 && killed <= kills,
        "{killed} killed segments for {kills} kills"
    );
    let cost: serde_json::Value = serde_json::from_slice(&std::fs::read(run_dir.join("cost.json")).unwrap()).unwrap();
    let sum: f64 = ledger.iter().map(|r| r["wall_seconds"].as_f64().unwrap()).sum();
    assert!((cost["total_wall_seconds"].as_f64().unwrap() - sum).abs() < 1e-9);
    eprintln!(
        "kill test: {kills} kill points, {} runs, {temps_seen} kills left an unfinished checkpoint write behind, \
         {killed} killed segments billed; all {} stages bitwise equal to the uninterrupted run",
        attempts,
        stages.len()
    );
}

#[test]
fn cost_projects_the_deepseek_r1_table_from_its_inputs() {
    // DeepSeek-R1 (Nature 645, 2025), supplementary cost table: 512 H800 for about
    // 198 h (R1-Zero), about 5K GPU-hours (SFT data), 512 H800 for 80 h (R1), at $2.
    let rows = [
        (vec!["--wall-hours", "198", "--count", "512"], "101,376", "$202,752"),
        (vec!["--device-hours", "5000"], "5,000", "$10,000"),
        (vec!["--wall-hours", "80", "--count", "512"], "40,960", "$81,920"),
    ];
    for (args, hours, dollars) in rows {
        let out = ok(bin().args(["cost", "--device", "H800"]).args(&args));
        assert!(out.contains(hours) && out.contains(dollars), "{args:?}:\n{out}");
    }
    let err = fails(bin().args(["cost", "--device", "H800"]));
    assert!(err.contains("--params") && err.contains("--device-hours"), "{err}");
    let err = fails(bin().args(["cost", "--device", "TPU", "--params", "1e9", "--tokens", "1e9"]));
    assert!(err.contains("peak"), "{err}");
}

/// `--kernels plain` runs the whole pipeline on plain candle ops; it trains the same
/// models as the default fused CPU kernels (up to float summation order over 30 steps),
/// the report names what ran, and an unknown value is an error naming the choices.
#[test]
fn plain_kernels_train_the_same_models_as_the_fused_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let fused = tiny_run(&tmp.path().join("fused"));
    ok(bin()
        .arg("--config")
        .arg(tiny())
        .args(["--kernels", "plain", "--out-dir"])
        .arg(tmp.path().join("plain")));
    let plain = tmp.path().join("plain/tiny");
    let report = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
    };
    let (rf, rp) = (report(&fused), report(&plain));
    assert_eq!(rf["kernels"], "fused");
    assert_eq!(rp["kernels"], "plain");
    assert!(std::fs::read_to_string(fused.join("report.md"))
        .unwrap()
        .contains("fused CPU kernels"));
    for (a, b) in rf["models"]
        .as_array()
        .unwrap()
        .iter()
        .zip(rp["models"].as_array().unwrap())
    {
        let (la, lb) = (a["eval_loss"].as_f64().unwrap(), b["eval_loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-3 * lb.abs(),
            "{}: fused {la} plain {lb}",
            a["name"]
        );
    }
    let err = fails(
        bin()
            .arg("--config")
            .arg(tiny())
            .args(["--kernels", "fast", "--out-dir"])
            .arg(tmp.path().join("bad")),
    );
    assert!(err.contains("\"plain\""), "{err}");
}

/// The ledger of `run_dir`, one JSON value per record.
fn ledger_records(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("ledger.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("record without {key}: {v}"))
}

/// A run killed inside the student stage and resumed: every record bills its own time and
/// work, the report's cost of each model is the sum of its records, the resumed segment's
/// FLOPs per step equal the uninterrupted stage's (so its MFU is a real one), and the
/// billed seconds add up to the lifetimes of the two processes.
#[test]
fn a_killed_and_resumed_run_bills_every_second_and_reports_the_sum_of_its_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bill.toml");
    let body = std::fs::read_to_string(tiny())
        .unwrap()
        .replace("name = \"tiny\"", "name = \"bill\"")
        .replace(
            "[student.train]\nsteps = 30",
            "[student.train]\nsteps = 30\nsave_every = 5",
        )
        + "\n[cost]\npeak_flops_per_device = 1e10\n";
    std::fs::write(&cfg, body).unwrap();
    run_variant(&cfg, &tmp.path().join("ref"), "bill");
    let reference = ledger_records(&tmp.path().join("ref/bill"));

    // Optimizer writes: the teacher's final checkpoint, then the student's at steps 5, 10
    // and 15: the process aborts half-way through the last, inside the student stage.
    let out = tmp.path().join("killed");
    let run_dir = out.join("bill");
    let t0 = std::time::Instant::now();
    let first = run(bin()
        .arg("--config")
        .arg(&cfg)
        .arg("--out-dir")
        .arg(&out)
        .env("DISTILL_CRASH_IN_WRITE", "optimizer.safetensors:4"));
    let first_life = t0.elapsed().as_secs_f64();
    assert!(!first.status.success());
    let t1 = std::time::Instant::now();
    let (status, err) = resume_with(&run_dir, &[], None);
    let second_life = t1.elapsed().as_secs_f64();
    assert!(status.success(), "{err}");

    let records = ledger_records(&run_dir);
    let stages: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{}{}",
                r["stage"].as_str().unwrap(),
                if r["interrupted"] == true { " (killed)" } else { "" }
            )
        })
        .collect();
    assert!(stages.contains(&"student (killed)".to_string()), "{stages:?}");
    assert!(stages.contains(&"resume".to_string()), "{stages:?}");

    // Every second of both processes is billed, within 5%.
    let billed: f64 = records.iter().map(|r| num(r, "wall_seconds")).sum();
    let lives = first_life + second_life;
    assert!(
        billed <= lives && billed >= 0.95 * lives,
        "billed {billed:.2} s of {lives:.2} s of process lifetime ({stages:?})"
    );

    // The resumed student segment did steps 11..=30 of the stage, the killed one steps
    // 1..=15 (its last heartbeat): each record carries its own work, and the completed
    // one also the whole stage's, exactly the uninterrupted stage's.
    let student = |rs: &[serde_json::Value], killed: bool| {
        rs.iter()
            .find(|r| r["stage"] == "student" && (r["interrupted"] == true) == killed)
            .cloned()
            .unwrap()
    };
    let (whole, resumed, killed) = (
        student(&reference, false),
        student(&records, false),
        student(&records, true),
    );
    let work = |r: &serde_json::Value| num(r, "flops") + num(r, "teacher_flops");
    let stage_flops = resumed["stage_flops"].as_array().unwrap();
    assert_eq!(
        (stage_flops[0].as_f64().unwrap(), stage_flops[1].as_f64().unwrap()),
        (num(&whole, "flops"), num(&whole, "teacher_flops")),
        "the resumed stage's whole work: {resumed}"
    );
    // Steps differ a little in padded length, so the shares are checked to 10%.
    let share = |r: &serde_json::Value| work(r) / work(&whole);
    assert!(
        (share(&resumed) - 20.0 / 30.0).abs() < 0.1 * 20.0 / 30.0,
        "resumed: {resumed}"
    );
    assert!(
        (share(&killed) - 15.0 / 30.0).abs() < 0.1 * 15.0 / 30.0,
        "killed: {killed}"
    );
    let got = work(&resumed) / 20.0;
    let mfu = |r: &serde_json::Value| r["mfu"].as_f64().unwrap();
    let wall_per_step = num(&resumed, "wall_seconds") / 20.0;
    // MFU is a timing, so it is printed rather than asserted (the machines are shared):
    // `cargo test -p distill-cli --test e2e -- a_killed_and_resumed --nocapture`.
    eprintln!(
        "student MFU: uninterrupted {:?}, killed segment {:?}, resumed segment {:?}",
        whole["mfu"].as_f64(),
        killed["mfu"].as_f64(),
        resumed["mfu"].as_f64()
    );
    assert!(
        (mfu(&resumed) - got / wall_per_step / 1e10 / 2.0).abs() < 1e-9,
        "MFU is the segment's FLOPs over its own wall time: {resumed}"
    );

    // The report prices each model at the sum of its records.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("report.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
    for model in ["teacher", "student", "baseline"] {
        let sum: f64 = records
            .iter()
            .filter(|r| r["stage"] == model)
            .map(|r| num(r, "device_hours"))
            .sum();
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {model} |")))
            .unwrap_or_else(|| panic!("no row for {model} in\n{md}"));
        assert!(
            row.contains(&format!("| {sum:.4} |")),
            "{model}: {sum:.4} device-hours expected in {row}"
        );
    }
    assert_eq!(report["cost"]["stages"].as_array().unwrap().len(), records.len());
}
