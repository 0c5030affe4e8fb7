//! The command line a new user meets: `distill init` writes a complete config that
//! `distill --config` accepts, and failures exit with the code of their kind
//! (`distill --help` lists them). Each test runs in seconds: nothing trains.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use distill::error::exit;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_distill"))
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml")
}

fn output(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the distill binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "distill panicked:\n{stderr}");
    out
}

/// Runs distill expecting exit code `code`; returns stderr.
fn exits_with(code: u8, cmd: &mut Command) -> String {
    let out = output(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(i32::from(code)), "{cmd:?}\n{stderr}");
    stderr
}

#[test]
fn init_writes_a_complete_commented_config_that_distill_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("my.toml");
    exits_with(exit::OK, bin().arg("init").arg(&file));
    let text = std::fs::read_to_string(&file).unwrap();

    // Every key of the config types is there: set to its default, or (unset optional
    // keys) commented out with an example; every key has its doc above it.
    for f in distill::config::schema::fields::<distill::Config>().unwrap() {
        let (section, name) = f.key.rsplit_once('.').unwrap();
        let table = format!("[{section}]");
        let at = text
            .find(&format!("\n{table}\n"))
            .unwrap_or_else(|| panic!("{table} missing"));
        let body = &text[at + table.len() + 2..];
        let body = &body[..body.find("\n[").unwrap_or(body.len())];
        let written = if f.optional {
            format!("\n# {name} = ")
        } else {
            format!("\n{name} = ")
        };
        let is_table = matches!(f.kind, distill::config::schema::Kind::Map(_));
        assert!(
            body.contains(&written) || (is_table && text.contains(&format!("[{}]", f.key))),
            "{} is not in the file distill init wrote",
            f.key
        );
    }

    // The loader and its validation accept it, and it is the default config.
    let cfg = distill::Config::load(&file).unwrap();
    assert_eq!(cfg, distill::Config::default());

    // The binary accepts it too: --dry-run checks the config, the flags and the device.
    let out = output(bin().arg("--config").arg(&file).arg("--dry-run"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resolved = distill::Config::parse(&String::from_utf8_lossy(&out.stdout), Path::new("resolved")).unwrap();
    assert_eq!(resolved, distill::Config::default());

    // An existing file is never replaced without --force; `-` prints instead.
    let err = exits_with(exit::USAGE, bin().arg("init").arg(&file));
    assert!(err.contains("my.toml") && err.contains("--force"), "{err}");
    exits_with(exit::OK, bin().arg("init").arg(&file).arg("--force"));
    let printed = output(bin().args(["init", "-"]));
    assert_eq!(String::from_utf8_lossy(&printed.stdout), text);

    // With no file named, it writes distill.toml in the current folder.
    exits_with(exit::OK, bin().arg("init").current_dir(tmp.path()));
    assert_eq!(std::fs::read_to_string(tmp.path().join("distill.toml")).unwrap(), text);
}

#[test]
fn help_lists_the_exit_codes() {
    let out = output(bin().arg("--help"));
    let help = String::from_utf8_lossy(&out.stdout);
    for (code, meaning) in distill::error::EXIT_CODES {
        assert!(
            help.contains(&format!("{code:>3}  {meaning}")),
            "{code} missing from --help:\n{help}"
        );
    }
    let guide = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/guide.md");
    let guide = std::fs::read_to_string(guide).unwrap();
    for (code, meaning) in distill::error::EXIT_CODES {
        assert!(
            guide.contains(&format!("| {code} | {meaning} |")),
            "docs/guide.md's exit-code table lacks `| {code} | {meaning} |`"
        );
    }
}

#[test]
fn config_and_usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[student.train]\nlearning_rate = 0.1\n").unwrap();
    let err = exits_with(exit::USAGE, bin().arg("--config").arg(&cfg).arg("--dry-run"));
    assert!(err.contains("bad.toml") && err.contains("learning_rate"), "{err}");
    exits_with(exit::USAGE, bin().arg("--no-such-flag"));
    exits_with(
        exit::USAGE,
        bin().arg("--config").arg(tiny()).args(["--dtype", "f8", "--dry-run"]),
    );
    exits_with(
        exit::USAGE,
        bin().arg("--config").arg(tiny()).args(["--device", "gpu", "--dry-run"]),
    );
    // A run directory that exists is replaced only with --force.
    std::fs::create_dir_all(tmp.path().join("tiny")).unwrap();
    let err = exits_with(
        exit::USAGE,
        bin().arg("--config").arg(tiny()).arg("--out-dir").arg(tmp.path()),
    );
    assert!(err.contains("--force"), "{err}");
    exits_with(exit::USAGE, bin().arg("resume").arg(tmp.path()));
}

#[test]
fn data_errors_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \"b\"}\nnot json\n").unwrap();
    let cfg = tmp.path().join("cfg.toml");
    std::fs::write(&cfg, format!("[data]\nsource = \"jsonl\"\npath = {data:?}\n")).unwrap();
    let err = exits_with(
        exit::DATA,
        bin().arg("--config").arg(&cfg).arg("--out-dir").arg(tmp.path()),
    );
    assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
}

/// A bad on-policy prompts file is a data error before any stage runs (no run folder).
#[test]
fn an_onpolicy_prompts_file_is_checked_before_any_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    let long = "seven ".repeat(400);
    std::fs::write(
        &prompts,
        format!("{{\"prompt\": \"Tom has 3 apples.\\n\"}}\n{{\"prompt\": \"{long}\"}}\n"),
    )
    .unwrap();
    let cfg = tmp.path().join("cfg.toml");
    let body = std::fs::read_to_string(tiny()).unwrap()
        + "\n[traces]\nenabled = true\n\n[onpolicy]\nenabled = true\nprompts = \"file\"\nprompts_path = \"prompts.jsonl\"\n";
    std::fs::write(&cfg, body).unwrap();
    let run_fails = |out: &str| {
        exits_with(
            exit::DATA,
            bin()
                .arg("--config")
                .arg(&cfg)
                .arg("--out-dir")
                .arg(tmp.path().join(out)),
        )
    };
    let err = run_fails("a");
    assert!(
        err.contains("prompts.jsonl") && err.contains("prompt 2") && err.contains("data.seq_len"),
        "{err}"
    );
    assert!(
        !tmp.path().join("a").exists(),
        "no run folder for a run that cannot start"
    );
    std::fs::remove_file(&prompts).unwrap();
    let err = run_fails("b");
    assert!(
        err.contains("prompts.jsonl") && err.contains("onpolicy.prompts_path"),
        "{err}"
    );
}

#[test]
fn checkpoint_errors_exit_4() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no_such_checkpoint");
    let err = exits_with(exit::CHECKPOINT, bin().arg("eval").arg("--checkpoint").arg(&missing));
    assert!(err.contains("no_such_checkpoint"), "{err}");
    // A checkpoint folder without its weights.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    exits_with(
        exit::CHECKPOINT,
        bin()
            .arg("generate")
            .arg("--checkpoint")
            .arg(&empty)
            .args(["--prompt", "1 + 1 ="]),
    );
}

/// A device this machine cannot open: in a CPU build any cuda device, in a cuda build one
/// past the last GPU (or any, without a driver). Nothing runs on the CPU instead.
#[test]
fn device_errors_exit_5() {
    let tmp = tempfile::tempdir().unwrap();
    let err = exits_with(
        exit::DEVICE,
        bin()
            .arg("--config")
            .arg(tiny())
            .args(["--device", "cuda:99", "--dry-run"]),
    );
    assert!(err.contains("cuda"), "{err}");
    exits_with(
        exit::DEVICE,
        bin()
            .arg("--config")
            .arg(tiny())
            .args(["--device", "cuda:99"])
            .arg("--out-dir")
            .arg(tmp.path()),
    );
    assert!(
        !tmp.path().join("tiny").exists(),
        "nothing may run after a refused device"
    );
}

/// A backend missing from the build is refused before any work.
#[cfg(not(feature = "mpi"))]
#[test]
fn distributed_launch_errors_exit_6() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("mpi.toml");
    let tiny_text = std::fs::read_to_string(tiny()).unwrap();
    std::fs::write(&cfg, format!("{tiny_text}\n[distributed]\nbackend = \"mpi\"\n")).unwrap();
    let err = exits_with(
        exit::DISTRIBUTED,
        bin().arg("--config").arg(&cfg).arg("--out-dir").arg(tmp.path()),
    );
    assert!(err.contains("--features mpi"), "{err}");
}

/// Interrupted: `distill` keeps the default action of SIGINT and SIGTERM, so the run ends
/// at once by the signal (a shell reports 128 + its number: 130, 143) and the run
/// directory stays resumable.
#[cfg(unix)]
#[test]
fn sigint_and_sigterm_end_a_run_by_the_signal() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    for (signal, number) in [("INT", 2), ("TERM", 15)] {
        let mut child = bin()
            .arg("--config")
            .arg(tiny())
            .arg("--out-dir")
            .arg(tmp.path())
            .args(["--name", signal])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(700));
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(number), "SIG{signal}: {status:?}");
        if signal == "INT" {
            assert_eq!(i32::from(exit::INTERRUPTED), 128 + number, "the documented code");
        }
    }
}
