//! A teacher's content id is the full SHA-256 of its weights: two teachers that differ
//! in one weight get different ids, and trace shards or a logit cache made from one are
//! refused with the other.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;

use candle_core::{Device, Tensor};
use distill::config::ModelSpec;
use distill::model::{Llama, ModelConfig};
use distill::prepare::data::batch::Encoded;
use distill::prepare::tokenizer::Tokenizer;
use distill::teacher::logit_cache::{self, Expect, LogitCache};
use distill::teacher::traces::{self, TraceRecord, Verdict};
use distill::train::checkpoint::{self, SaveExtras};

const V: usize = 300;

fn model() -> Llama {
    let spec = ModelSpec {
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 1,
        num_heads: 2,
        max_position_embeddings: 32,
        ..ModelSpec::default()
    };
    Llama::init(ModelConfig::from_spec(&spec, V, 1, 2, 0), 0.02, 1, &Device::Cpu).unwrap()
}

fn save(dir: &Path, m: &Llama) {
    let texts = ["Ava has 3 apples. Then Ava buys 4 more.\n3 + 4 = 7\n#### 7"; 8];
    let tok = Tokenizer::train(texts.iter().copied(), V).unwrap();
    let extras = SaveExtras {
        tokenizer: &tok,
        resolved_config: "",
        state: None,
        optimizer: None,
    };
    checkpoint::save(dir, m, &extras).unwrap();
}

/// The same model with one element of one weight changed.
fn one_weight_changed(m: &Llama) -> Llama {
    let mut tensors = m.tensors().unwrap();
    let w = tensors.get("model.norm.weight").unwrap();
    let mut v = w.to_vec1::<f32>().unwrap();
    v[3] += 1e-3;
    let changed = Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap();
    tensors.insert("model.norm.weight".into(), changed);
    Llama::from_tensors(m.cfg.clone(), tensors, &Device::Cpu).unwrap()
}

fn record(teacher: &str, id: u64) -> TraceRecord {
    TraceRecord {
        id,
        sample: 0,
        prompt: "1 + 1 =".into(),
        completion: " 2\n#### 2".into(),
        answer: Some(2),
        predicted: Some(2),
        verdict: Verdict::Correct,
        kept: true,
        tokens: 4,
        teacher: teacher.into(),
        temperature: 0.7,
        top_p: 0.95,
        top_k: 0,
        max_new_tokens: 16,
        seed: 1,
    }
}

#[test]
fn one_changed_weight_changes_the_id_and_merge_and_the_cache_refuse_to_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = model();
    let b = one_weight_changed(&a);
    save(&a_dir, &a);
    save(&b_dir, &b);
    let (id_a, id_b) = (
        checkpoint::content_id(&a_dir).unwrap(),
        checkpoint::content_id(&b_dir).unwrap(),
    );
    // The full SHA-256, and a different one for a single changed weight.
    let hex = id_a.strip_prefix("sha256:").unwrap();
    assert_eq!(hex.len(), 64, "{id_a}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(id_a, id_b);
    assert_eq!(id_a, checkpoint::content_id(&a_dir).unwrap(), "the id is deterministic");

    // Trace shards of the two teachers are not merged.
    let (s0, s1) = (tmp.path().join("s0.jsonl"), tmp.path().join("s1.jsonl"));
    traces::write(&s0, &[record(&id_a, 0)]).unwrap();
    traces::write(&s1, &[record(&id_b, 1)]).unwrap();
    let err = traces::merge(&[s0.clone(), s1.clone()], None).unwrap_err().to_string();
    assert!(err.contains("another job") && err.contains(&id_b), "{err}");
    traces::write(&s1, &[record(&id_a, 1)]).unwrap();
    assert_eq!(traces::merge(&[s0, s1], None).unwrap().len(), 2);

    // A logit cache written from teacher a is refused for teacher b, and reopens for a.
    let data: Vec<Encoded> = (0..3)
        .map(|i| Encoded {
            ids: (0..6).map(|j| ((i * 7 + j * 5) % (V - 3) + 3) as u32).collect(),
            prompt_len: 2,
        })
        .collect();
    let expect = |teacher: &str| Expect {
        teacher: teacher.into(),
        data_fingerprint: logit_cache::fingerprint(&data),
        k: 4,
        temperature: 2.0,
        vocab_size: V,
    };
    let cache = tmp.path().join("cache");
    logit_cache::write(&cache, &a, &data, &expect(&id_a), 2, &|_, _| {}).unwrap();
    let err = LogitCache::open(&cache, &data, &expect(&id_b))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("content id") && err.contains(&id_a), "{err}");
    assert!(LogitCache::open(&cache, &data, &expect(&id_a)).is_ok());
}

/// A sharded teacher's id covers the weights of every shard, not the index file.
#[test]
fn a_sharded_teacher_is_identified_by_its_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    let index = r#"{"metadata": {}, "weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    std::fs::write(dir.join("part-1.safetensors"), b"first shard").unwrap();
    std::fs::write(dir.join("part-2.safetensors"), b"second shard").unwrap();
    let before = checkpoint::content_id(&dir).unwrap();
    std::fs::write(dir.join("part-2.safetensors"), b"second sharD").unwrap();
    let after = checkpoint::content_id(&dir).unwrap();
    assert_ne!(before, after, "a changed byte in the second shard changes the id");
    std::fs::remove_file(dir.join("part-1.safetensors")).unwrap();
    let err = checkpoint::content_id(&dir).unwrap_err().to_string();
    assert!(err.contains("part-1.safetensors"), "{err}");
}
