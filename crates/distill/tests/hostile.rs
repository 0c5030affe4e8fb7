//! Hostile input: damaged checkpoints, data and trace files, and random
//! configs. Every case must end in an error that names the file (or the
//! config key), never in a panic. The mutations are seeded, so a failure
//! reproduces; DISTILL_MUTATIONS raises their number (default 150 per file).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::Device;
use distill::config::{ModelSpec, TrainSpec};
use distill::model::{Llama, ModelConfig};
use distill::prepare::tokenizer::Tokenizer;
use distill::train::checkpoint::{self, SaveExtras, TrainerState};
use distill::train::optim::AdamW;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn mutations() -> usize {
    std::env::var("DISTILL_MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

/// Flips, overwrites, truncates or extends `bytes`.
fn mutate(bytes: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.random_range(0..4) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
        }
        2 => b.truncate(rng.random_range(0..b.len())),
        _ => {
            let i = rng.random_range(0..b.len());
            let junk: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
            b.splice(i..i, junk);
        }
    }
    b
}

/// A checkpoint with weights, tokenizer, training state and optimizer moments.
fn write_checkpoint(dir: &Path) {
    let spec = ModelSpec {
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 1,
        num_heads: 2,
        max_position_embeddings: 32,
        ..ModelSpec::default()
    };
    let texts = ["Ava has 3 apples. Then Ava buys 4 more.\n3 + 4 = 7\n#### 7"; 8];
    let tok = Tokenizer::train(texts.iter().copied(), 300).unwrap();
    let m = Llama::init(ModelConfig::from_spec(&spec, 300, 1, 2, 0), 0.02, 1, &Device::Cpu).unwrap();
    let opt = AdamW::new(&TrainSpec::default(), m.params()).unwrap();
    let state = TrainerState {
        stage: "student".into(),
        step: 1,
        total_steps: 2,
        micro_batches: 1,
        seed: 1,
        tokens_seen: 10,
        last_loss: Some(1.0),
        flops: 1.0,
        teacher_flops: 0.0,
        checksums: Default::default(),
    };
    let extras = SaveExtras {
        tokenizer: &tok,
        resolved_config: "",
        state: Some(&state),
        optimizer: Some(&opt),
    };
    checkpoint::save(dir, &m, &extras).unwrap();
}

/// Everything a resume does with a checkpoint directory.
fn open_all(dir: &Path) -> distill::Result<()> {
    let (m, _) = checkpoint::load(dir, &Device::Cpu)?;
    let mut opt = AdamW::new(&TrainSpec::default(), m.params())?;
    checkpoint::load_training_state(dir, &mut opt, &Device::Cpu)?;
    checkpoint::verify(dir)?;
    Ok(())
}

#[test]
fn damaged_checkpoint_files_are_errors_naming_the_file_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    write_checkpoint(&good);
    open_all(&good).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let files = [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.json",
        "optimizer.safetensors",
    ];
    let (mut tried, mut refused) = (0, 0);
    for file in files {
        let original = std::fs::read(good.join(file)).unwrap();
        for i in 0..mutations() {
            let dir = tmp.path().join(format!("m-{file}-{i}"));
            std::fs::create_dir(&dir).unwrap();
            for f in std::fs::read_dir(&good).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
            }
            std::fs::write(dir.join(file), mutate(&original, &mut rng)).unwrap();
            let result = catch_unwind(AssertUnwindSafe(|| open_all(&dir)));
            let result = result.unwrap_or_else(|_| panic!("panic on a damaged {file} (mutation {i})"));
            tried += 1;
            if let Err(e) = result {
                refused += 1;
                let msg = e.to_string();
                assert!(
                    msg.contains(&*dir.to_string_lossy()),
                    "the error for a damaged {file} does not name it: {msg}"
                );
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    // Checksums catch what still parses: every mutation of the weights or the
    // moments is refused.
    eprintln!("checkpoint mutations: {tried} tried, {refused} refused with an error, 0 panics");
    assert!(
        refused * 10 >= tried * 8,
        "only {refused} of {tried} damaged checkpoints were refused"
    );
}

#[test]
fn damaged_data_and_trace_files_are_errors_naming_the_line_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl: String = (0..6)
        .map(|i| {
            format!(
                "{{\"prompt\":\"Ava has {i} apples.\",\"completion\":\"{i} + 1 = {}\\n#### {}\"}}\n",
                i + 1,
                i + 1
            )
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let path = tmp.path().join("data.jsonl");
    let mut errors = 0;
    for i in 0..mutations() {
        std::fs::write(&path, mutate(jsonl.as_bytes(), &mut rng)).unwrap();
        for (what, r) in [
            (
                "data",
                catch_unwind(|| distill::prepare::data::read_jsonl(&path).map(|_| ())),
            ),
            (
                "prompts",
                catch_unwind(|| distill::teacher::traces::read_prompts(&path).map(|_| ())),
            ),
            (
                "traces",
                catch_unwind(|| distill::teacher::traces::read(&path).map(|_| ())),
            ),
        ] {
            match r.unwrap_or_else(|_| panic!("panic reading a damaged {what} file (mutation {i})")) {
                Ok(()) => {}
                Err(e) => {
                    errors += 1;
                    assert!(e.to_string().contains("data.jsonl"), "{e}");
                }
            }
        }
    }
    assert!(errors > 0);
}

/// Known config keys, each with the section it lives in.
const KEYS: &[(&str, &str)] = &[
    ("run", "name"),
    ("run", "seed"),
    ("run", "device"),
    ("run", "keep_checkpoints"),
    ("data", "source"),
    ("data", "train_examples"),
    ("data", "seq_len"),
    ("data", "max_operand"),
    ("data", "min_steps"),
    ("data", "eval_fraction"),
    ("tokenizer", "vocab_size"),
    ("teacher", "checkpoint"),
    ("teacher.model", "hidden_size"),
    ("teacher.model", "num_heads"),
    ("student.model", "num_kv_heads"),
    ("student.model", "init_std"),
    ("student.train", "steps"),
    ("student.train", "lr"),
    ("student.train", "batch_size"),
    ("student.train", "on_nonfinite"),
    ("distill", "ce_weight"),
    ("distill", "temperature"),
    ("distill", "loss"),
    ("traces", "enabled"),
    ("traces", "samples"),
    ("traces", "top_p"),
    ("traces", "keep"),
    ("cost", "cpu_core_hour"),
    ("cost", "peak_flops_per_device"),
    ("eval", "batch_size"),
    ("nonsense", "key"),
    ("student.train", "learning_rate"),
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| if v.is_finite() { format!("{v:e}") } else { "nan".into() }),
        any::<bool>().prop_map(|v| v.to_string()),
        "[a-z_/.:0-9 ]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("-0.0".to_string()),
        Just("1e308".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random keys, types and values: a config parses, or the error names the
    /// file and one of the keys; it never panics.
    #[test]
    fn random_configs_never_panic(entries in proptest::collection::vec((0..KEYS.len(), value()), 0..6)) {
        let mut text = String::new();
        let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
        for (k, v) in &entries {
            let (section, key) = KEYS[*k];
            let line = format!("{key} = {v}");
            match sections.iter_mut().find(|(s, _)| *s == section) {
                Some((_, lines)) => lines.push(line),
                None => sections.push((section, vec![line])),
            }
        }
        for (section, lines) in &sections {
            text += &format!("[{section}]\n{}\n", lines.join("\n"));
        }
        let r = catch_unwind(|| distill::Config::parse(&text, Path::new("random.toml")));
        prop_assert!(r.is_ok(), "panic on config:\n{}", text);
        if let Ok(Err(e)) = r {
            let msg = e.to_string();
            prop_assert!(msg.contains("random.toml"), "error does not name the file: {}", msg);
        }
    }
}

#[test]
fn a_huge_safetensors_header_length_is_refused_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    write_checkpoint(&dir);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let err = match checkpoint::load(&dir, &Device::Cpu) {
        Ok(_) => panic!("a header length of 2^60 was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("model.safetensors") && err.contains("header claims"),
        "{err}"
    );
}
