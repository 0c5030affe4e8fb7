//! Hostile input: damaged checkpoints, data and trace files, random configs, and
//! hostile model files (config.json, tokenizer_config.json, generation_config.json),
//! logit caches, trace shards given to merge, and prompts longer than the context.
//! Every case must end in an error that names the file (or the config key), never in a
//! panic, an abort, an out-of-memory kill, or a NaN reported as a result. The mutations
//! are seeded, so a failure reproduces; DISTILL_MUTATIONS sets their number per file
//! (default 150).
//!
//! The model-file and cache classes run in a child process of this test binary with its
//! address space bounded (`ulimit -v`): a size that slipped past the checks then fails
//! an allocation, and the test, instead of taking the machine's memory.

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
        rollout: Default::default(),
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

// ---------------------------------------------------------------------------------
// Hostile model files, logit caches, trace shards and long prompts.
// ---------------------------------------------------------------------------------

use distill::model::generate::Sampling;
use distill::prepare::data::batch::Encoded;
use distill::teacher::logit_cache::{self, Expect, LogitCache};
use distill::teacher::traces::{self, Prompt, TraceRecord, TraceSettings, Verdict};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Structured mutations per class (DISTILL_MUTATIONS overrides; 150 by default).
fn structured_mutations() -> usize {
    std::env::var("DISTILL_MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

const CHILD_ENV: &str = "DISTILL_HOSTILE_CHILD";
/// The child's address space: the tiny models here use a few hundred MiB of it (thread
/// stacks and allocator arenas included); a config size that got past the checks would
/// ask for gigabytes and fail here instead of on the machine.
const CHILD_ADDRESS_SPACE_KIB: u64 = 4 << 20;

/// Runs `body` in a child process of this test binary whose address space is bounded,
/// and fails if the child fails in any way (a panic, an abort, a kill). The child prints
/// its per-class counts on lines starting with "hostile", which are passed on.
fn in_bounded_child(test: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            for l in limits.lines().filter(|l| l.starts_with("Max address space")) {
                eprintln!(
                    "hostile child {test}: {}",
                    l.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
        }
        body();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {CHILD_ADDRESS_SPACE_KIB} || echo 'hostile: could not bound the address space' >&2; \
             exec \"$0\" \"$@\""
        ))
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .env("MALLOC_ARENA_MAX", "2")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines().filter(|l| l.starts_with("hostile")) {
        eprintln!("{line}");
    }
    let tail: String = {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    assert!(
        out.status.success() && text.contains("test result: ok. 1 passed"),
        "the child running {test} failed ({}): a panic, an abort or an allocation past {} GiB. It printed:\n{tail}",
        out.status,
        CHILD_ADDRESS_SPACE_KIB >> 20
    );
}

/// What one class of hostile inputs came to.
#[derive(Default)]
struct Tally {
    tried: usize,
    refused: usize,
    accepted: usize,
}

impl Tally {
    fn report(&self, class: &str) {
        eprintln!(
            "hostile {class}: {} inputs, {} refused with an error naming the file, {} accepted with finite results; \
             0 panics, 0 NaN results",
            self.tried, self.refused, self.accepted
        );
    }
}

/// Values that break a JSON field: other types, NaN-like and number-like strings, huge,
/// negative, zero, fractional and tiny numbers, and values near `original`.
fn hostile_value(original: &Value, rng: &mut ChaCha8Rng) -> Value {
    let mut choices = vec![
        json!("1e-5"),
        json!("yes"),
        json!("x"),
        json!("NaN"),
        json!("inf"),
        json!("-1"),
        json!(""),
        json!("<|eos|>"),
        json!("<|pad|>"),
        json!("<|nope|>"),
        json!(true),
        json!(false),
        Value::Null,
        json!([]),
        json!([1, 2]),
        json!({}),
        json!({"content": 3}),
        json!({"content": "<|bos|>"}),
        json!(u64::MAX),
        json!(1u64 << 32),
        json!(1u64 << 40),
        json!(1_000_000_000_000u64),
        json!(9_007_199_254_740_993u64),
        json!(16_777_216u64),
        json!(1e308),
        json!(1e30),
        json!(-1),
        json!(-1e-5),
        json!(i64::MIN),
        json!(0),
        json!(0.0),
        json!(1.5),
        json!(16.0),
        json!(1e-300),
        json!(5e-324),
    ];
    if let Some(n) = original.as_u64() {
        choices.extend([n + 1, n.saturating_sub(1), n * 2, n / 2, n.saturating_mul(1000)].map(|m| json!(m)));
    }
    if let Some(x) = original.as_f64() {
        choices.extend([json!(-x), json!(x * 1e10), json!(x * 1e-10)]);
    }
    if let Some(t) = original.as_str() {
        choices.extend([
            json!(format!("{t}x")),
            json!(t.to_uppercase()),
            json!(&t[..t.len() / 2]),
        ]);
    }
    choices[rng.random_range(0..choices.len())].clone()
}

/// JSON pointers of every value in `v` (the root excluded).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        _ => {}
    }
}

/// Removes the value at pointer `p` (a key of an object or an element of a list).
fn remove_at(v: &mut Value, p: &str) {
    let (parent, last) = p.rsplit_once('/').unwrap_or(("", p));
    let last = last.replace("~1", "/").replace("~0", "~");
    match v.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.remove(&last);
        }
        Some(Value::Array(a)) => {
            if let Ok(i) = last.parse::<usize>() {
                if i < a.len() {
                    a.remove(i);
                }
            }
        }
        _ => {}
    }
}

/// One structured mutation of a JSON document: a value anywhere in it replaced by a
/// hostile one (most often), a key removed, a key from `extra` added (features the model
/// does not implement), two of these at once, the whole document replaced by a
/// non-object, or (one time in ten) a byte-level mutation of its text.
fn mutate_json(text: &[u8], extra: &[(&str, Value)], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(text) else {
        return mutate(text, rng);
    };
    let rounds = if rng.random_range(0..10) == 0 { 2 } else { 1 };
    for _ in 0..rounds {
        let mut ps = Vec::new();
        pointers(&v, String::new(), &mut ps);
        match rng.random_range(0..20) {
            0..=11 if !ps.is_empty() => {
                let p = &ps[rng.random_range(0..ps.len())];
                let new = hostile_value(v.pointer(p).unwrap_or(&Value::Null), rng);
                if let Some(slot) = v.pointer_mut(p) {
                    *slot = new;
                }
            }
            12..=14 if !ps.is_empty() => {
                let p = ps[rng.random_range(0..ps.len())].clone();
                remove_at(&mut v, &p);
            }
            15..=16 if !extra.is_empty() => {
                let (k, x) = &extra[rng.random_range(0..extra.len())];
                if let Some(m) = v.as_object_mut() {
                    m.insert(k.to_string(), x.clone());
                }
            }
            17 => v = [json!([1, 2]), json!(3), json!("config"), Value::Null][rng.random_range(0..4)].clone(),
            _ => return mutate(text, rng),
        }
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

/// Keys (with values) a mutation may add to a JSON document.
type Extras = Vec<(&'static str, Value)>;

/// Keys a Llama config.json may carry for features this model does not implement.
fn config_extras() -> Vec<(&'static str, Value)> {
    vec![
        ("rope_scaling", json!({"type": "linear", "factor": 2.0})),
        ("rope_scaling", Value::Null),
        ("hidden_act", json!("gelu")),
        ("mlp_bias", json!(true)),
        ("use_sliding_window", json!(true)),
        ("attention_bias", json!(true)),
        ("model_type", json!("mistral")),
        ("model_type", json!("qwen2")),
        ("head_dim", json!(3)),
        ("eos_token_id", json!([2, 1])),
        ("max_position_embeddings", json!(16_777_217u64)),
    ]
}

/// A tiny checkpoint whose tokenizer knows the arithmetic task, with a context long
/// enough for its held-out sequences, and the config `distill eval` would take with it.
fn write_eval_checkpoint(dir: &Path) -> distill::Config {
    let mut cfg = distill::Config::default();
    cfg.data.train_examples = 16;
    cfg.data.eval_examples = 4;
    cfg.data.seq_len = 96;
    cfg.eval.examples = 2;
    cfg.eval.max_new_tokens = 4;
    cfg.eval.batch_size = 2;
    let splits = distill::prepare::data::load(&cfg.data, cfg.run.seed).unwrap();
    let texts: Vec<String> = splits
        .train
        .iter()
        .map(|e| format!("{}{}", e.prompt, e.completion))
        .collect();
    let tok = Tokenizer::train(texts.iter().map(String::as_str), 300).unwrap();
    let spec = ModelSpec {
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 1,
        num_heads: 2,
        max_position_embeddings: 128,
        ..ModelSpec::default()
    };
    let mc = ModelConfig::from_spec(&spec, tok.vocab_size(), tok.bos, tok.eos, tok.pad);
    let m = Llama::init(mc, 0.02, 1, &Device::Cpu).unwrap();
    let extras = SaveExtras {
        tokenizer: &tok,
        resolved_config: "",
        state: None,
        optimizer: None,
    };
    checkpoint::save(dir, &m, &extras).unwrap();
    cfg
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

/// What `distill eval --checkpoint DIR --config FILE` does, with its verdict: Ok(loss)
/// only for a finite held-out loss (anything else fails the test), or the error's text.
fn eval_outcome(dir: &Path, cfg: &distill::Config) -> std::result::Result<f32, String> {
    match distill::evaluate::eval_checkpoint(dir, Some(cfg), &Device::Cpu, distill::config::MatmulWeights::Dense) {
        Ok(r) => {
            assert!(
                r.eval_loss.is_finite(),
                "{}: a held-out loss of {} was reported as a result",
                dir.display(),
                r.eval_loss
            );
            Ok(r.eval_loss)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Mutations of one checkpoint file: every outcome is a finite result or an error naming
/// the directory and the file; no panic.
fn hostile_checkpoint_file(
    file: &str,
    good: &Path,
    cfg: &distill::Config,
    extra: &[(&str, Value)],
    seed: u64,
) -> Tally {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let original = std::fs::read(good.join(file)).unwrap();
    let root = good.parent().unwrap();
    let mut t = Tally::default();
    for i in 0..structured_mutations() {
        let dir = root.join(format!("m-{file}-{i}"));
        copy_dir(good, &dir);
        let bytes = mutate_json(&original, extra, &mut rng);
        std::fs::write(dir.join(file), &bytes).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| eval_outcome(&dir, cfg))).unwrap_or_else(|_| {
            panic!(
                "panic on a hostile {file} (mutation {i}):\n{}",
                String::from_utf8_lossy(&bytes)
            )
        });
        t.tried += 1;
        match r {
            Ok(_) => t.accepted += 1,
            Err(msg) => {
                t.refused += 1;
                assert!(
                    msg.contains(&*dir.to_string_lossy()) && msg.contains(file),
                    "the error for a hostile {file} (mutation {i}) does not name it: {msg}\n{}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    t
}

/// config.json, tokenizer_config.json and generation_config.json, mutated value by value:
/// no panic, no abort, no allocation past the child's bound, no NaN loss reported, and
/// every error names the file.
#[test]
fn hostile_model_config_files_are_errors_naming_the_file_or_finite_results() {
    in_bounded_child(
        "hostile_model_config_files_are_errors_naming_the_file_or_finite_results",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let good = tmp.path().join("good");
            let cfg = write_eval_checkpoint(&good);
            let loss = eval_outcome(&good, &cfg).unwrap();
            eprintln!("hostile: the unmutated checkpoint evaluates to a held-out loss of {loss:.4}");
            let token_extras = vec![
                ("bos_token", json!(1)),
                ("eos_token", json!(["<|eos|>"])),
                ("pad_token", json!({"content": "<|nope|>"})),
                ("eos_token", json!({"text": "<|eos|>"})),
            ];
            let gen_extras = vec![
                ("eos_token_id", json!([2, 1])),
                ("eos_token_id", json!([])),
                ("max_new_tokens", json!(-4)),
                ("temperature", json!("hot")),
                ("top_p", json!(2.0)),
                ("do_sample", json!("yes")),
            ];
            let classes: [(&str, Extras, u64); 3] = [
                ("config.json", config_extras(), 101),
                ("tokenizer_config.json", token_extras, 102),
                ("generation_config.json", gen_extras, 103),
            ];
            for (file, extra, seed) in classes {
                hostile_checkpoint_file(file, &good, &cfg, &extra, seed).report(file);
            }
        },
    );
}

/// The cases of issue 21, one by one: each error names config.json (or the file) and the key.
#[test]
fn hostile_config_values_of_the_issue_are_refused_with_the_key() {
    in_bounded_child("hostile_config_values_of_the_issue_are_refused_with_the_key", || {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        let cfg = write_eval_checkpoint(&good);
        let config: Value = serde_json::from_slice(&std::fs::read(good.join("config.json")).unwrap()).unwrap();
        let cases: Vec<(&str, Value, &str)> = vec![
            // Sizes far beyond the weights: refused before anything is allocated.
            ("max_position_embeddings", json!(1u64 << 40), "max_position_embeddings"),
            ("vocab_size", json!(1u64 << 40), "vocab_size"),
            ("hidden_size", json!(1u64 << 40), "hidden_size"),
            ("intermediate_size", json!(1u64 << 40), "intermediate_size"),
            ("num_hidden_layers", json!(1u64 << 40), "num_hidden_layers"),
            ("num_attention_heads", json!(1u64 << 40), "num_attention_heads"),
            ("num_key_value_heads", json!(1u64 << 40), "num_key_value_heads"),
            ("num_hidden_layers", json!(u64::MAX), "num_hidden_layers"),
            // Out of range.
            ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
            ("rms_norm_eps", json!(-1e-5), "rms_norm_eps"),
            ("rms_norm_eps", json!(5e-324), "rms_norm_eps"),
            ("rope_theta", json!(0.0), "rope_theta"),
            ("rope_theta", json!(-10000.0), "rope_theta"),
            ("rope_theta", json!(1e-300), "rope_theta"),
            ("eos_token_id", json!(1_000_000), "eos_token_id"),
            ("pad_token_id", json!(300), "pad_token_id"),
            ("num_key_value_heads", json!(0), "num_key_value_heads"),
            // Present with the wrong type: never a silent default.
            ("rms_norm_eps", json!("1e-5"), "rms_norm_eps"),
            ("rms_norm_eps", json!("NaN"), "rms_norm_eps"),
            ("tie_word_embeddings", json!("yes"), "tie_word_embeddings"),
            ("rope_theta", json!("x"), "rope_theta"),
            ("num_key_value_heads", json!("2"), "num_key_value_heads"),
            ("bos_token_id", json!([1]), "bos_token_id"),
            ("hidden_size", json!(16.5), "hidden_size"),
            // Features the model does not implement.
            ("rope_scaling", json!({"type": "linear", "factor": 4.0}), "rope_scaling"),
            ("hidden_act", json!("gelu"), "hidden_act"),
        ];
        for (i, (key, value, named)) in cases.iter().enumerate() {
            let dir = tmp.path().join(format!("case-{i}"));
            copy_dir(&good, &dir);
            let mut c = config.clone();
            c[*key] = value.clone();
            std::fs::write(dir.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
            let err = eval_outcome(&dir, &cfg).expect_err(&format!("{key} = {value} was accepted"));
            assert!(
                err.contains("config.json") && err.contains(named),
                "{key} = {value}: the error does not name config.json and `{named}`: {err}"
            );
        }
        // The largest context that is accepted builds no table for it.
        let dir = tmp.path().join("long-context");
        copy_dir(&good, &dir);
        let mut c = config.clone();
        c["max_position_embeddings"] = json!(16_777_216u64);
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
        eval_outcome(&dir, &cfg).unwrap();
        // A special token of the wrong type in tokenizer_config.json.
        for (key, value) in [
            ("eos_token", json!(5)),
            ("bos_token", json!(["<|bos|>"])),
            ("pad_token", json!(true)),
        ] {
            let dir = tmp.path().join(format!("tok-{key}"));
            copy_dir(&good, &dir);
            let p = dir.join("tokenizer_config.json");
            let mut t: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            t[key] = value.clone();
            std::fs::write(&p, serde_json::to_vec(&t).unwrap()).unwrap();
            let err = eval_outcome(&dir, &cfg).expect_err(&format!("{key} = {value} was accepted"));
            assert!(err.contains("tokenizer_config.json") && err.contains(key), "{err}");
        }
        eprintln!(
            "hostile issue cases: {} config values and 3 special tokens refused with the key",
            cases.len()
        );
    });
}

/// Weights that are finite but overflow the forward give a non-finite loss: `distill eval`
/// must fail naming the checkpoint, never print `held-out loss: NaN` and succeed. Weights
/// holding NaN are refused on load.
#[test]
fn non_finite_outputs_and_weights_are_errors_not_results() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let cfg = write_eval_checkpoint(&good);
    let (m, tok) = checkpoint::load(&good, &Device::Cpu).unwrap();
    for (name, scale) in [("overflow", 1e30f64), ("nan", f64::NAN)] {
        // up and down projections of 1e30 each: the MLP's output is ~1e59, inf in f32.
        let mut tensors = m.tensors().unwrap();
        for w in ["up_proj", "down_proj"] {
            let key = format!("model.layers.0.mlp.{w}.weight");
            let big = (tensors[&key].ones_like().unwrap() * scale).unwrap();
            tensors.insert(key, big);
        }
        let dir = tmp.path().join(name);
        let result = Llama::from_tensors(m.cfg.clone(), tensors, &Device::Cpu);
        if name == "nan" {
            let err = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("NaN or infinite") && err.contains("_proj.weight"), "{err}");
            continue;
        }
        let bad = result.unwrap();
        let extras = SaveExtras {
            tokenizer: &tok,
            resolved_config: "",
            state: None,
            optimizer: None,
        };
        checkpoint::save(&dir, &bad, &extras).unwrap();
        let err = eval_outcome(&dir, &cfg).expect_err("a model with overflowing outputs was evaluated");
        assert!(
            err.contains(&*dir.to_string_lossy()) && err.contains("not finite"),
            "{err}"
        );
    }
}

/// A small logit cache over a tiny teacher, and what its stage would expect.
fn write_cache(dir: &Path) -> (Vec<Encoded>, Expect) {
    let spec = ModelSpec {
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 1,
        num_heads: 2,
        max_position_embeddings: 32,
        ..ModelSpec::default()
    };
    let v = 50;
    let teacher = Llama::init(ModelConfig::from_spec(&spec, v, 1, 2, 0), 0.5, 3, &Device::Cpu).unwrap();
    let data: Vec<Encoded> = (0..7)
        .map(|i| Encoded {
            ids: (0..4 + (i * 5) % 9)
                .map(|j| ((i * 13 + j * 7) % (v - 3) + 3) as u32)
                .collect(),
            prompt_len: 1 + i % 3,
        })
        .collect();
    let expect = Expect {
        teacher: "sha256:test".into(),
        data_fingerprint: logit_cache::fingerprint(&data),
        k: 4,
        temperature: 2.0,
        vocab_size: v,
    };
    logit_cache::write(dir, &teacher, &data, &expect, 3, &|_, _| {}).unwrap();
    (data, expect)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A shard rewritten as a valid safetensors file with hostile contents: ids outside the
/// vocabulary or repeated, log-probabilities that are NaN, infinite or positive, another
/// shape or dtype, a tensor missing or renamed.
fn hostile_shard(bytes: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes).unwrap();
    let ids = st.tensor("indices").unwrap();
    let lps = st.tensor("log_probs").unwrap();
    let (rows, k) = (ids.shape()[0], ids.shape()[1]);
    let mut id_bytes = ids.data().to_vec();
    let mut lp_bytes = lps.data().to_vec();
    let (mut names, mut shape, mut id_dtype) = (["indices", "log_probs"], vec![rows, k], Dtype::U32);
    let cell = rng.random_range(0..rows * k) * 4;
    match rng.random_range(0..9) {
        0 => id_bytes[cell..cell + 4].copy_from_slice(&[50u32, 51, u32::MAX][rng.random_range(0..3)].to_le_bytes()),
        1 if k > 1 => {
            let row = cell / (4 * k) * 4 * k;
            let first: Vec<u8> = id_bytes[row..row + 4].to_vec();
            id_bytes[row + 4..row + 8].copy_from_slice(&first);
        }
        2 => lp_bytes[cell..cell + 4]
            .copy_from_slice(&[f32::NAN, f32::INFINITY, 0.5, 1e-3][rng.random_range(0..4)].to_le_bytes()),
        3 => {
            // Every log-probability of a row raised to 0: a mass of k.
            let row = cell / (4 * k) * 4 * k;
            lp_bytes[row..row + 4 * k].fill(0);
        }
        4 => shape = vec![rows.saturating_sub(1), k],
        5 => shape = vec![rows, k + 1],
        6 => id_dtype = Dtype::I32,
        7 => names = ["indices", "log_probz"],
        _ => shape = vec![rows * k],
    }
    let need = |dtype: Dtype| shape.iter().product::<usize>() * dtype.bitsize() / 8;
    id_bytes.resize(need(id_dtype), 0);
    lp_bytes.resize(need(Dtype::F32), 0);
    let views = vec![
        (names[0], TensorView::new(id_dtype, shape.clone(), &id_bytes).unwrap()),
        (names[1], TensorView::new(Dtype::F32, shape.clone(), &lp_bytes).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

/// The logit cache's index.json (structured mutations of every value, the shard entries'
/// included) and its shards (byte-level and structured, with the index's checksum made to
/// match, so that the reader's own checks are what stands): each open is a valid cache or
/// an error naming the file.
#[test]
fn hostile_logit_caches_are_errors_naming_the_file_or_valid_caches() {
    in_bounded_child(
        "hostile_logit_caches_are_errors_naming_the_file_or_valid_caches",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let good = tmp.path().join("good");
            let (data, expect) = write_cache(&good);
            LogitCache::open(&good, &data, &expect).unwrap();
            let index_text = std::fs::read(good.join("index.json")).unwrap();
            let index: Value = serde_json::from_slice(&index_text).unwrap();
            let shards: Vec<String> = index["shards"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["file"].as_str().unwrap().to_string())
                .collect();
            let mut rng = ChaCha8Rng::seed_from_u64(104);
            let extra = vec![("shards", json!([])), ("format", json!("other")), ("version", json!(2))];
            for class in ["index.json", "shards"] {
                let mut t = Tally::default();
                for i in 0..structured_mutations() {
                    let dir = tmp.path().join(format!("m-{class}-{i}"));
                    copy_dir(&good, &dir);
                    let named = if class == "index.json" {
                        std::fs::write(dir.join("index.json"), mutate_json(&index_text, &extra, &mut rng)).unwrap();
                        "index.json".to_string()
                    } else {
                        let s = rng.random_range(0..shards.len());
                        let path = dir.join(&shards[s]);
                        let bytes = std::fs::read(&path).unwrap();
                        let new = if rng.random_range(0..2) == 0 {
                            mutate(&bytes, &mut rng)
                        } else {
                            hostile_shard(&bytes, &mut rng)
                        };
                        std::fs::write(&path, &new).unwrap();
                        // The checksum follows the damage, so the reader's own checks decide.
                        let mut ix = index.clone();
                        ix["shards"][s]["sha256"] = json!(sha256_hex(&new));
                        std::fs::write(dir.join("index.json"), serde_json::to_vec(&ix).unwrap()).unwrap();
                        shards[s].clone()
                    };
                    let r = catch_unwind(AssertUnwindSafe(|| LogitCache::open(&dir, &data, &expect)))
                        .unwrap_or_else(|_| panic!("panic on a hostile logit cache {class} (mutation {i})"));
                    t.tried += 1;
                    match r {
                        Ok(cache) => {
                            t.accepted += 1;
                            // What was accepted is a valid top-k teacher on every counted row.
                            let items: Vec<usize> = (0..data.len()).collect();
                            let top = cache.batch(&items, 13, &Device::Cpu).unwrap();
                            let ids = top.indices.flatten_all().unwrap().to_vec1::<u32>().unwrap();
                            let lps = top.log_probs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                            assert!(ids.iter().all(|&i| (i as usize) < expect.vocab_size), "mutation {i}");
                            assert!(lps.iter().all(|l| !l.is_nan() && *l <= 1e-4), "mutation {i}");
                        }
                        Err(e) => {
                            t.refused += 1;
                            let msg = e.to_string();
                            assert!(
                                msg.contains(&*dir.to_string_lossy()) && msg.contains(&named),
                                "the error for a hostile {named} (mutation {i}) does not name it: {msg}"
                            );
                        }
                    }
                    std::fs::remove_dir_all(&dir).unwrap();
                }
                t.report(&format!("logit cache {class}"));
            }
        },
    );
}

/// A trace record of a two-shard job over `prompts` prompts and 2 samples.
fn record(id: u64, sample: u32) -> TraceRecord {
    let correct = (id + sample as u64).is_multiple_of(3);
    TraceRecord {
        id,
        sample,
        prompt: format!("Ava has {id} apples."),
        completion: format!("{id} + 1 = {}\n#### {}", id + 1, id + 1),
        answer: Some(id as i64 + 1),
        predicted: Some(id as i64 + 1 - (!correct) as i64),
        verdict: if correct { Verdict::Correct } else { Verdict::Wrong },
        kept: correct,
        tokens: 9,
        teacher: "sha256:0123456789abcdef".into(),
        temperature: 0.7,
        top_p: 0.95,
        top_k: 0,
        max_new_tokens: 64,
        seed: 5,
    }
}

/// Trace shards given to merge: a line's values mutated (structured), a line dropped,
/// repeated or moved to the other shard, or the bytes damaged. Merge returns records it
/// can vouch for or an error naming a shard; never a panic.
#[test]
fn hostile_trace_shards_for_merge_are_errors_naming_a_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts: Vec<Prompt> = (0..6)
        .map(|id| Prompt {
            id,
            prompt: format!("Ava has {id} apples."),
            answer: Some(id as i64 + 1),
        })
        .collect();
    let shard_records = |s: u64| -> Vec<TraceRecord> {
        (0..6)
            .filter(|id| id % 2 == s)
            .flat_map(|id| [record(id, 0), record(id, 1)])
            .collect()
    };
    let good: Vec<String> = (0..2).map(|s| traces::to_jsonl(&shard_records(s)).unwrap()).collect();
    let paths: Vec<PathBuf> = (0..2).map(|s| tmp.path().join(format!("shard-{s}.jsonl"))).collect();
    for (p, text) in paths.iter().zip(&good) {
        std::fs::write(p, text).unwrap();
    }
    assert_eq!(traces::merge(&paths, Some(&prompts)).unwrap().len(), 12);
    let extra = vec![("extra", json!(1)), ("verdict", json!("prompt_too_long"))];
    let mut rng = ChaCha8Rng::seed_from_u64(105);
    let mut t = Tally::default();
    for i in 0..structured_mutations() * 2 {
        let s = rng.random_range(0..2);
        let mut lines: Vec<String> = good[s].lines().map(str::to_string).collect();
        let mut other: Vec<String> = good[1 - s].lines().map(str::to_string).collect();
        let n = rng.random_range(0..lines.len());
        match rng.random_range(0..10) {
            0 => {
                lines.remove(n);
            }
            1 => lines.push(lines[n].clone()),
            2 => other.push(lines.remove(n)),
            3 => {
                let text = lines.join("\n");
                lines = String::from_utf8_lossy(&mutate(text.as_bytes(), &mut rng))
                    .lines()
                    .map(str::to_string)
                    .collect();
            }
            _ => {
                lines[n] =
                    String::from_utf8_lossy(&mutate_json(lines[n].as_bytes(), &extra, &mut rng)).replace('\n', "")
            }
        }
        std::fs::write(&paths[s], lines.join("\n") + "\n").unwrap();
        std::fs::write(&paths[1 - s], other.join("\n") + "\n").unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| traces::merge(&paths, Some(&prompts))))
            .unwrap_or_else(|_| panic!("panic merging hostile trace shards (mutation {i})"));
        t.tried += 1;
        match r {
            Ok(records) => {
                t.accepted += 1;
                // What merge returns is one record per (prompt, sample), sorted, and kept
                // only where correct.
                let keys: Vec<(u64, u32)> = records.iter().map(|r| (r.id, r.sample)).collect();
                assert!(keys.windows(2).all(|w| w[0] < w[1]), "mutation {i}: {keys:?}");
                assert!(
                    records.iter().all(|r| !r.kept || r.verdict == Verdict::Correct),
                    "mutation {i}"
                );
            }
            Err(e) => {
                t.refused += 1;
                let msg = e.to_string();
                assert!(
                    paths.iter().any(|p| msg.contains(&*p.to_string_lossy())),
                    "the error for hostile trace shards (mutation {i}) names no shard: {msg}"
                );
            }
        }
    }
    t.report("trace shards (merge)");
}

/// Prompts too long for the model's context get their own verdict, prompt_too_long, with
/// no tokens, counted in the acceptance figures; the others are sampled as usual. Old
/// trace files (without the verdict) and old acceptance figures (without the count) read.
#[test]
fn prompts_longer_than_the_context_are_counted_as_too_long() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("ck");
    write_checkpoint(&good); // max_position_embeddings 32
    let (model, tok) = checkpoint::load(&good, &Device::Cpu).unwrap();
    let context = model.cfg.max_position_embeddings;
    let mut rng = ChaCha8Rng::seed_from_u64(106);
    let words = ["Ava", "has", "3", "apples", ".", "Then", "buys", "4", "more", "+", "="];
    let prompts: Vec<Prompt> = (0..structured_mutations() as u64)
        .map(|id| {
            let n = rng.random_range(1..2 * context);
            let text: Vec<&str> = (0..n).map(|_| words[rng.random_range(0..words.len())]).collect();
            Prompt {
                id,
                prompt: text.join(" "),
                answer: Some(7),
            }
        })
        .collect();
    let settings = TraceSettings {
        samples: 2,
        sampling: Sampling {
            max_new_tokens: 3,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 1,
        },
        keep: distill::config::Keep::First,
        max_completion_tokens: None,
        batch_rows: 16,
    };
    let (records, acc) = traces::generate(
        &model,
        &tok,
        "sha256:test",
        &prompts,
        &settings,
        traces::Shard::WHOLE,
        &mut |_, _| {},
    )
    .unwrap();
    let mut too_long = 0;
    for p in &prompts {
        let len = 1 + tok.encode(&p.prompt).unwrap().len();
        let mine: Vec<&TraceRecord> = records.iter().filter(|r| r.id == p.id).collect();
        assert_eq!(mine.len(), 2);
        if len >= context {
            too_long += 1;
            assert!(
                mine.iter()
                    .all(|r| r.verdict == Verdict::PromptTooLong && r.tokens == 0 && !r.kept),
                "prompt {} of {len} tokens",
                p.id
            );
        } else {
            assert!(
                mine.iter().all(|r| r.verdict != Verdict::PromptTooLong),
                "prompt {} of {len} tokens",
                p.id
            );
        }
    }
    assert!(
        too_long > 0 && too_long < prompts.len(),
        "{too_long} of {} too long",
        prompts.len()
    );
    assert_eq!(acc.prompts_too_long, too_long);
    eprintln!(
        "hostile long prompts: {} prompts, {too_long} longer than the context of {context}, each sample recorded as prompt_too_long",
        prompts.len()
    );
    // The file round-trips, and the verdict is written as prompt_too_long.
    let path = tmp.path().join("traces.jsonl");
    traces::write(&path, &records).unwrap();
    assert_eq!(traces::read(&path).unwrap(), records);
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains("\"verdict\":\"prompt_too_long\""));
    // Old files: a record written before the verdict existed, and figures without the count.
    let old = traces::to_jsonl(&[TraceRecord {
        verdict: Verdict::Unfinished,
        kept: false,
        ..record(0, 0)
    }])
    .unwrap();
    std::fs::write(&path, old).unwrap();
    assert_eq!(traces::read(&path).unwrap()[0].verdict, Verdict::Unfinished);
    let figures = r#"{"prompts":1,"samples":2,"correct":1,"kept":1,"prompts_solved":1,"acceptance_rate":0.5,"tokens":9,"flops":0.0}"#;
    let a: traces::Acceptance = serde_json::from_str(figures).unwrap();
    assert_eq!(a.prompts_too_long, 0);
}
