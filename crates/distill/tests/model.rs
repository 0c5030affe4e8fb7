//! The model really trains, matches candle-transformers' Llama, and its
//! checkpoints really reload.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use distill::config::{Kernels, ModelSpec, TrainSpec};
use distill::model::{Llama, ModelConfig};
use distill::prepare::tokenizer::Tokenizer;
use distill::train::checkpoint::{self, SaveExtras, TrainerState};
use distill::train::optim::AdamW;

type R = distill::Result<()>;

fn cfg(tied: bool, bias: bool, kv_heads: usize) -> ModelConfig {
    let spec = ModelSpec {
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: Some(kv_heads),
        tie_embeddings: tied,
        attention_bias: bias,
        max_position_embeddings: 64,
        ..ModelSpec::default()
    };
    ModelConfig::from_spec(&spec, 300, 1, 2, 0)
}

fn ids(b: usize, t: usize, seed: u32) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7919 + seed * 104_729) % 300).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn tokenizer() -> Tokenizer {
    let texts = ["Ava has 3 apples. Then Ava buys 4 more.\n3 + 4 = 7\n#### 7"; 20];
    Tokenizer::train(texts.iter().copied(), 300).unwrap()
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() -> R {
    for (tied, bias, kv) in [(false, true, 2), (true, false, 4), (false, false, 1)] {
        let m = Llama::init(cfg(tied, bias, kv), 0.02, 1, &Device::Cpu)?;
        let x = ids(2, 12, 3);
        let targets = ids(2, 12, 4).flatten_all()?;
        let logits = m.forward(&x)?.flatten_to(1)?; // (B*T, V)
        let mask = Tensor::ones(24, DType::F32, &Device::Cpu)?;
        let loss =
            distill::loss::distill_loss(&logits, None, &targets, &mask, &distill::loss::LossSpec::CE_ONLY, 24.0)?;
        let grads = loss.total.backward()?;
        let mut missing = vec![];
        for (name, var) in m.params() {
            let nonzero = match grads.get(var.as_tensor()) {
                Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
                None => false,
            };
            if !nonzero {
                missing.push(name.clone());
            }
        }
        assert!(
            missing.is_empty(),
            "tied={tied} bias={bias} kv={kv}: no gradient for {missing:?}"
        );
        assert!(m.params().len() >= 20);
    }
    Ok(())
}

#[test]
fn one_training_step_lowers_the_loss() -> R {
    let m = Llama::init(cfg(false, false, 2), 0.02, 5, &Device::Cpu)?;
    let x = ids(4, 16, 1);
    let targets = ids(4, 16, 2).flatten_all()?;
    let mask = Tensor::ones(64, DType::F32, &Device::Cpu)?;
    let spec = TrainSpec::default();
    let mut opt = AdamW::new(&spec, m.params())?;
    let loss_of = |m: &Llama| -> distill::Result<(Tensor, f32)> {
        let logits = m.forward(&x)?.flatten_to(1)?;
        let l = distill::loss::distill_loss(&logits, None, &targets, &mask, &distill::loss::LossSpec::CE_ONLY, 64.0)?;
        let v = l.total.to_scalar::<f32>()?;
        Ok((l.total, v))
    };
    let (l0, before) = loss_of(&m)?;
    let g = l0.backward()?;
    let grads: BTreeMap<String, Tensor> = m
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), g.get(v.as_tensor()).unwrap().clone()))
        .collect();
    opt.step(m.params(), &grads, 1e-2)?;
    let (_, after) = loss_of(&m)?;
    assert!(after < before - 0.05, "loss {before} -> {after}");
    Ok(())
}

/// Our last-position logits equal candle-transformers' Llama for the same weights.
#[test]
fn matches_candle_transformers_llama() -> R {
    use candle_transformers::models::llama as ct;
    for tied in [false, true] {
        let m = Llama::init(cfg(tied, false, 2), 0.2, 11, &Device::Cpu)?;
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        let tok = tokenizer();
        checkpoint::save(
            &ck,
            &m,
            &SaveExtras {
                tokenizer: &tok,
                resolved_config: "",
                state: None,
                optimizer: None,
            },
        )?;
        let hf: ct::LlamaConfig = serde_json::from_slice(&std::fs::read(ck.join("config.json")).unwrap()).unwrap();
        let hf = hf.into_config(false);
        // SAFETY: the file was just written by us and is not modified while mapped.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[ck.join("model.safetensors")], DType::F32, &Device::Cpu)?
        };
        let theirs = ct::Llama::load(vb, &hf)?;
        let mut cache = ct::Cache::new(false, DType::F32, &hf, &Device::Cpu)?;
        let x = ids(1, 20, 9);
        let want = theirs.forward(&x, 0, &mut cache)?.flatten_all()?; // (V,)
        let ours = m.forward(&x)?.narrow(1, 19, 1)?.flatten_all()?;
        let diff = (want - ours)?.abs()?.max(D::Minus1)?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "tied={tied}: max |diff| = {diff}");
    }
    Ok(())
}

/// Two sequences of different lengths share the slotted cache: one prefilled with 6
/// tokens, the other with 3, then both decoded a token at a time in the same steps.
/// Every position's hidden state equals the full forward's, on both kernel sets.
#[test]
fn slotted_kv_cache_gives_the_same_hidden_states_as_a_full_forward() -> R {
    use distill::kernels::decode::CacheRows;
    use distill::model::slots::KvSlots;
    for kernels in [Kernels::Fused, Kernels::Plain] {
        let mut m = Llama::init(cfg(false, true, 2), 0.2, 3, &Device::Cpu)?;
        m.set_kernels(kernels);
        let x = ids(2, 10, 5);
        let full = m.forward_hidden(&x)?; // (2, 10, d)
        let seq = |b: usize| -> Vec<u32> { x.get(b).unwrap().to_vec1().unwrap() };
        let (a, b) = (seq(0), seq(1));
        let cache = KvSlots::new(&m, 3, 10)?;
        // Slot 2 holds sequence a, slot 0 sequence b.
        let mut tokens: Vec<u32> = a[..6].to_vec();
        tokens.extend(&b[..3]);
        let rows = CacheRows {
            slot: [vec![2; 6], vec![0; 3]].concat(),
            pos: (0..6).chain(0..3).collect(),
            max_len: 10,
        };
        let mut got = vec![m.forward_slots(&tokens, &rows, &cache)?];
        let mut want = vec![full.get(0)?.narrow(0, 0, 6)?, full.get(1)?.narrow(0, 0, 3)?];
        for t in 0..4 {
            let rows = CacheRows {
                slot: vec![2, 0],
                pos: vec![6 + t, 3 + t],
                max_len: 10,
            };
            got.push(m.forward_slots(&[a[6 + t], b[3 + t]], &rows, &cache)?);
            want.push(Tensor::stack(&[full.get(0)?.get(6 + t)?, full.get(1)?.get(3 + t)?], 0)?);
        }
        let diff = (Tensor::cat(&got, 0)? - Tensor::cat(&want, 0)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{kernels:?}: max |diff| = {diff}");
    }
    Ok(())
}

#[test]
fn same_seed_gives_bitwise_identical_weights() -> R {
    let a = Llama::init(cfg(false, true, 2), 0.02, 42, &Device::Cpu)?.tensors()?;
    let b = Llama::init(cfg(false, true, 2), 0.02, 42, &Device::Cpu)?.tensors()?;
    let c = Llama::init(cfg(false, true, 2), 0.02, 43, &Device::Cpu)?.tensors()?;
    let bits = |m: &BTreeMap<String, Tensor>| -> Vec<u32> {
        m.values()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f32::to_bits)
            .collect()
    };
    assert_eq!(bits(&a), bits(&b));
    assert_ne!(bits(&a), bits(&c));
    Ok(())
}

#[test]
fn checkpoint_reloads_model_tokenizer_and_optimizer() -> R {
    let m = Llama::init(cfg(false, true, 2), 0.02, 8, &Device::Cpu)?;
    let tok = tokenizer();
    let mut opt = AdamW::new(&TrainSpec::default(), m.params())?;
    let grads: BTreeMap<String, Tensor> = m
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.ones_like().unwrap()))
        .collect();
    opt.step(m.params(), &grads, 1e-3)?;
    let state = TrainerState {
        stage: "student".into(),
        step: 1,
        total_steps: 10,
        micro_batches: 1,
        seed: 3,
        tokens_seen: 100,
        last_loss: Some(1.5),
        flops: 1e9,
        teacher_flops: 0.0,
        rollout: Default::default(),
        checksums: Default::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("student");
    let extras = SaveExtras {
        tokenizer: &tok,
        resolved_config: "[run]\nname = \"x\"\n",
        state: Some(&state),
        optimizer: Some(&opt),
    };
    checkpoint::save(&ck, &m, &extras)?;
    // Saving again replaces the directory atomically and leaves no temp folders.
    checkpoint::save(&ck, &m, &extras)?;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("student")]);

    let (m2, tok2) = checkpoint::load(&ck, &Device::Cpu)?;
    assert_eq!(m2.cfg, m.cfg);
    let x = ids(2, 8, 1);
    let a = m.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    let b = m2.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b, "reloaded weights must be bitwise equal");
    assert_eq!(tok2.encode("Ava has 3")?, tok.encode("Ava has 3")?);

    let mut opt2 = AdamW::new(&TrainSpec::default(), m2.params())?;
    let mut s2 = checkpoint::load_training_state(&ck, &mut opt2, &Device::Cpu)?;
    assert_eq!(s2.checksums.len(), 2, "weights and moments are checksummed");
    s2.checksums.clear();
    assert_eq!(s2, state);
    // The checksums catch a damaged file that still parses.
    checkpoint::verify(&ck)?;
    let opt_file = ck.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&opt_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&opt_file, &bytes).unwrap();
    let err = checkpoint::verify(&ck).unwrap_err().to_string();
    assert!(
        err.contains("optimizer.safetensors") && err.contains("checksum"),
        "{err}"
    );
    assert_eq!(opt2.step, 1);
    for (k, t) in &opt.v {
        assert_eq!(
            t.flatten_all()?.to_vec1::<f32>()?,
            opt2.v[k].flatten_all()?.to_vec1::<f32>()?
        );
    }
    // The HF metadata that transformers checks is present.
    let bytes = std::fs::read(ck.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let hf: serde_json::Value = serde_json::from_slice(&std::fs::read(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["model_type"], "qwen2", "q/k/v biases are saved as a Qwen2 config");
    Ok(())
}

#[test]
fn damaged_checkpoints_are_clear_errors_not_panics() -> R {
    let m = Llama::init(cfg(true, false, 2), 0.02, 8, &Device::Cpu)?;
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let extras = SaveExtras {
        tokenizer: &tok,
        resolved_config: "",
        state: None,
        optimizer: None,
    };
    checkpoint::save(&good, &m, &extras)?;
    let copy = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["model.safetensors", "config.json", "tokenizer.json"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    let load_err = |d: &std::path::Path| -> String {
        match checkpoint::load(d, &Device::Cpu) {
            Ok(_) => panic!("{} loaded but is damaged", d.display()),
            Err(e) => e.to_string(),
        }
    };

    let d = copy("missing");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.safetensors is missing"), "{e}");

    for cut in [0usize, 7, 100, 5000] {
        let d = copy(&format!("trunc{cut}"));
        let bytes = std::fs::read(good.join("model.safetensors")).unwrap();
        std::fs::write(d.join("model.safetensors"), &bytes[..cut.min(bytes.len() - 1)]).unwrap();
        let e = load_err(&d);
        assert!(e.contains("model.safetensors"), "{e}");
    }

    let d = copy("badjson");
    std::fs::write(d.join("config.json"), b"{\"hidden_size\": 32,").unwrap();
    let e = load_err(&d);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");

    let d = copy("badshape");
    let mut hf: serde_json::Value = serde_json::from_slice(&std::fs::read(good.join("config.json")).unwrap()).unwrap();
    hf["intermediate_size"] = 50.into();
    std::fs::write(d.join("config.json"), serde_json::to_vec(&hf).unwrap()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("`intermediate_size` is 50") && e.contains("gate_proj.weight` has 48"),
        "{e}"
    );

    let d = copy("vocab");
    hf["intermediate_size"] = 48.into();
    hf["vocab_size"] = 100.into();
    std::fs::write(d.join("config.json"), serde_json::to_vec(&hf).unwrap()).unwrap();
    let e = load_err(&d);
    assert!(e.contains("vocab_size"), "{e}");
    Ok(())
}

/// Prompts of different lengths, some repeated (their prefill is shared), decoded two
/// at a time with continuous batching: greedy tokens equal the uncached reference's,
/// row by row, on both kernel sets; sampled rows equal the same rows decoded alone.
#[test]
fn the_rollout_engine_gives_the_same_tokens_as_uncached_decoding() -> R {
    use distill::model::generate::{generate_rows, generate_rows_uncached, row_rng, Sampling};
    // A wide init gives peaked, varied logits, so the tokens are not all one id.
    let mut m = Llama::init(cfg(false, true, 2), 0.5, 3, &Device::Cpu)?;
    let prompt = |r: u32, len: u32| -> Vec<u32> { (0..len).map(|i| (r * 31 + i * 7 + 3) % 300).collect() };
    let prompts = vec![
        prompt(0, 5),
        prompt(0, 5),
        prompt(1, 3),
        prompt(0, 5),
        prompt(2, 8),
        prompt(1, 3),
        prompt(3, 1),
    ];
    let eos = 299; // Never the argmax here, so every row runs the full length.
    let greedy = Sampling::greedy(20);
    for kernels in [Kernels::Fused, Kernels::Plain] {
        m.set_kernels(kernels);
        let uncached = generate_rows_uncached(&m, &prompts, eos, &greedy, &mut [])?;
        for rows in [1, 2, 7] {
            let mut done = 0;
            let (cached, flops) = generate_rows(&m, &prompts, eos, &greedy, &mut [], rows, &mut |d| done = d)?;
            assert_eq!(cached, uncached, "{kernels:?}, {rows} rows at once");
            assert!(flops > 0.0);
            assert_eq!(done, prompts.len());
        }
        let distinct: std::collections::BTreeSet<u32> = uncached.iter().flat_map(|g| g.ids.clone()).collect();
        assert!(distinct.len() > 3, "degenerate output: {uncached:?}");
        assert!(uncached.iter().all(|g| g.ids.len() == 20 && !g.finished));
    }

    // Sampling: each row has its own stream, so the same seeds give the same samples
    // whether a row is decoded alone or beside others, and repeated prompts differ.
    let s = Sampling {
        max_new_tokens: 12,
        temperature: 1.0,
        top_p: 0.9,
        top_k: 0,
        seed: 5,
    };
    let streams = |seed: u64| -> Vec<_> { (0..prompts.len() as u64).map(|r| row_rng(seed, r)).collect() };
    let (batch, _) = generate_rows(&m, &prompts, eos, &s, &mut streams(5), 3, &mut |_| {})?;
    let reference = generate_rows_uncached(&m, &prompts, eos, &s, &mut streams(5))?;
    assert_eq!(batch, reference);
    for r in [1, 4] {
        let (alone, _) = generate_rows(
            &m,
            &prompts[r..r + 1],
            eos,
            &s,
            &mut [row_rng(5, r as u64)],
            1,
            &mut |_| {},
        )?;
        assert_eq!(batch[r], alone[0]);
    }
    assert_ne!(batch[0], batch[1], "two samples of one prompt differ");
    let (other_seed, _) = generate_rows(&m, &prompts, eos, &s, &mut streams(6), 3, &mut |_| {})?;
    assert_ne!(batch, other_seed, "the seed changes the samples");
    Ok(())
}

/// A prompt that fills the context gets nothing, without stopping the others; one
/// that leaves room for two tokens gets at most two.
#[test]
fn prompts_at_the_end_of_the_context_get_what_fits() -> R {
    use distill::model::generate::{generate_rows, Sampling};
    let mut c = cfg(false, true, 2);
    c.max_position_embeddings = 8;
    let m = Llama::init(c, 0.5, 3, &Device::Cpu)?;
    let prompts = vec![vec![1; 8], vec![2; 6], vec![3; 2]];
    let (out, _) = generate_rows(&m, &prompts, 299, &Sampling::greedy(4), &mut [], 2, &mut |_| {})?;
    assert!(out[0].ids.is_empty() && !out[0].finished);
    assert_eq!(out[1].ids.len(), 2);
    assert_eq!(out[2].ids.len(), 4);
    Ok(())
}

fn sampling(temperature: f64, top_p: f64, top_k: usize) -> distill::model::generate::Sampling {
    distill::model::generate::Sampling {
        max_new_tokens: 1,
        temperature,
        top_p,
        top_k,
        seed: 0,
    }
}

#[test]
fn top_p_keeps_only_the_nucleus() {
    use distill::model::generate::{row_rng, sample};
    // Probabilities about 0.64, 0.24, 0.09, 0.03: top_p = 0.7 keeps the first two.
    let logits = [3.0f32, 2.0, 1.0, 0.0];
    let mut rng = row_rng(1, 0);
    let draws: Vec<u32> = (0..400)
        .map(|_| sample(&logits, &sampling(1.0, 0.7, 0), &mut rng))
        .collect();
    assert!(draws.iter().all(|&d| d < 2), "drew outside the nucleus");
    assert!(draws.contains(&0) && draws.contains(&1));
    let all: Vec<u32> = (0..400)
        .map(|_| sample(&logits, &sampling(1.0, 1.0, 0), &mut rng))
        .collect();
    assert!(all.contains(&3), "top_p = 1 keeps the tail");
    // A tiny temperature is as good as greedy.
    assert!((0..50).all(|_| sample(&logits, &sampling(1e-3, 1.0, 0), &mut rng) == 0));
}

/// top_k keeps the k most likely tokens (ties: the lower index), and the nucleus then
/// takes its mass of what they hold; top_k = 1 is greedy, and k >= V keeps them all.
#[test]
fn top_k_keeps_the_k_most_likely_tokens() {
    use distill::model::generate::{row_rng, sample};
    let logits = [0.0f32, 3.0, 1.0, 2.0, 1.0];
    let mut rng = row_rng(2, 0);
    let mut draw = |s: &distill::model::generate::Sampling| -> Vec<u32> {
        (0..400).map(|_| sample(&logits, s, &mut rng)).collect()
    };
    assert!(draw(&sampling(1.0, 1.0, 1)).iter().all(|&d| d == 1));
    let two = draw(&sampling(1.0, 1.0, 2));
    assert!(two.iter().all(|&d| d == 1 || d == 3) && two.contains(&1) && two.contains(&3));
    // Tokens 2 and 4 tie for third: the lower index is kept.
    let three = draw(&sampling(1.0, 1.0, 3));
    assert!(three.iter().all(|&d| d != 0 && d != 4) && three.contains(&2));
    // Of the top 2 (0.73, 0.27 once renormalised), a nucleus of 0.7 keeps the first.
    assert!(draw(&sampling(1.0, 0.7, 2)).iter().all(|&d| d == 1));
    assert!(draw(&sampling(1.0, 1.0, 9)).contains(&0), "k >= V keeps the tail");
}

/// Hugging Face checkpoints are often bf16 (SmolLM2's are). One rewritten in bf16 loads
/// as f32 master weights equal to the bf16 values, trains (every parameter gets an f32
/// gradient), and can be frozen back to bf16 as a teacher; its logits stay close to the
/// f32 model's.
#[test]
fn a_bf16_checkpoint_loads_as_f32_master_weights_and_freezes_to_bf16() -> R {
    let m = Llama::init(cfg(true, false, 2), 0.2, 5, &Device::Cpu)?;
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let tok = tokenizer();
    let extras = SaveExtras {
        tokenizer: &tok,
        resolved_config: "",
        state: None,
        optimizer: None,
    };
    checkpoint::save(&ck, &m, &extras)?;
    let half: std::collections::HashMap<String, Tensor> = m
        .tensors()?
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, ck.join("model.safetensors"))?;
    let (loaded, _) = checkpoint::load(&ck, &Device::Cpu)?;
    for (name, t) in loaded.tensors()? {
        assert_eq!(t.dtype(), DType::F32, "{name}");
        let want = half[&name].to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, want, "{name}: not the bf16 values");
    }
    let x = ids(2, 12, 3);
    let logits = loaded.forward(&x)?;
    let targets = ids(1, 24, 4).flatten_all()?;
    let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets)?;
    let grads = loss.backward()?;
    for (name, v) in loaded.params() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
    }
    let f32_logits = logits.flatten_all()?.to_vec1::<f32>()?;
    let frozen = loaded.into_frozen(DType::BF16)?;
    assert!(frozen.tensors()?.values().all(|t| t.dtype() == DType::BF16));
    let bf = frozen.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    let scale = f32_logits.iter().fold(0f32, |a, v| a.max(v.abs()));
    let worst = f32_logits.iter().zip(&bf).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
    assert!(
        worst <= 0.06 * scale,
        "bf16 teacher logits: max |diff| {worst} vs max |logit| {scale}"
    );
    Ok(())
}
