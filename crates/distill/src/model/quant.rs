//! 8-bit matmul weights for a model that only samples or scores (a teacher), as
//! llama.cpp runs a GGUF file's quantized weights: decoding one token at a time is
//! bound by reading the weights, and int8 weights (`kernels::int8`) are a quarter of
//! the bytes of f32 ones.
//!
//! Which weights: every matmul weight (attention and MLP projections, and the head).
//! The embedding lookup stays dense (a row gather reads one row a token); with tied
//! embeddings the head gets its own int8 copy and the lookup keeps the dense table.
//! Norms and biases stay f32. The quantized forward is `Llama::proj`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::config::MatmulWeights;
use crate::error::{Error, Result};
use crate::kernels::int8::{Int8Weight, BLOCK};
use crate::model::llama::{check_leftovers, check_shape, finite_f32};
use crate::model::{Llama, ModelConfig};

impl Llama {
    /// This model with its matmul weights stored as `format` says. `Dense` returns it
    /// unchanged; `Int8` freezes it (f32) and replaces each matmul weight by an int8 one.
    /// Errors, never a silent fallback: on a GPU, in a compute dtype other than f32, or
    /// where a weight's input width is not a multiple of the 32-weight block.
    pub fn with_matmul_weights(self, format: MatmulWeights) -> Result<Self> {
        match format {
            MatmulWeights::Dense => Ok(self),
            MatmulWeights::Int8 => self.quantize_matmuls(),
        }
    }

    /// How this model's matmul weights are stored.
    pub fn matmul_weights(&self) -> MatmulWeights {
        if self.quantized.is_empty() {
            MatmulWeights::Dense
        } else {
            MatmulWeights::Int8
        }
    }

    fn quantize_matmuls(self) -> Result<Self> {
        let refuse = |why: String| Error::Invalid(format!("matmul weights \"int8\": {why}; use \"dense\""));
        if !self.device().is_cpu() {
            return Err(refuse("int8 matmuls run on the CPU only in this version".into()));
        }
        if self.compute_dtype() != DType::F32 {
            return Err(refuse(format!(
                "int8 matmuls take f32 activations, and the compute dtype is {:?}",
                self.compute_dtype()
            )));
        }
        if !self.quantized.is_empty() {
            return Ok(self); // already int8 (e.g. loaded so from a GGUF file)
        }
        let mut m = if self.is_frozen() {
            self
        } else {
            self.into_frozen(DType::F32)?
        };
        let names: Vec<String> = m
            .cfg
            .param_shapes()
            .into_keys()
            .filter(|n| is_matmul(n, &m.cfg))
            .collect();
        for name in names {
            let q = int8_weight(&name, m.w(&name)?)?;
            m.quantized.insert(name.clone(), q);
            if name != EMBED {
                m.frozen.remove(&name); // the int8 weight replaces it
            }
        }
        Ok(m)
    }

    /// A frozen f32 model from its dense tensors (norms, biases, the embedding) and its
    /// int8 matmul weights, with `from_tensors`' checks: every tensor present with the
    /// shape `cfg` implies, nothing left over, every dense weight finite (`int8_weight`
    /// checked the others).
    pub(crate) fn from_dense_and_int8(
        cfg: ModelConfig,
        mut dense: BTreeMap<String, Tensor>,
        int8: BTreeMap<String, Int8Weight>,
        device: &Device,
    ) -> Result<Self> {
        cfg.check().map_err(Error::Shape)?;
        let mut shapes: BTreeMap<String, Vec<usize>> = int8
            .iter()
            .map(|(k, w)| (k.clone(), vec![w.dims().0, w.dims().1]))
            .collect();
        shapes.extend(dense.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())));
        cfg.check_shapes(&shapes).map_err(Error::Shape)?;
        let mut frozen = BTreeMap::new();
        for (name, shape) in cfg.param_shapes() {
            let held = shapes
                .get(&name)
                .ok_or_else(|| Error::Shape(format!("tensor `{name}` is missing")))?;
            check_shape(&name, held, &shape)?;
            if let Some(t) = dense.remove(&name) {
                frozen.insert(name.clone(), finite_f32(&name, &t, device)?);
            }
        }
        check_leftovers(&cfg, dense)?;
        let mut m = Llama::from_vars(cfg, BTreeMap::new(), device)?;
        m.frozen = frozen;
        m.quantized = int8;
        Ok(m)
    }
}

/// The embedding's name; with tied embeddings it is also the head.
pub(crate) const EMBED: &str = "model.embed_tokens.weight";

/// Whether int8 replaces the weight `name`: a 2-D parameter other than the embedding, or
/// the embedding when it is also the head.
pub(crate) fn is_matmul(name: &str, cfg: &ModelConfig) -> bool {
    if name == EMBED {
        return cfg.tie_word_embeddings;
    }
    cfg.param_shapes().get(name).is_some_and(|s| s.len() == 2)
}

/// The int8 weight of the matmul weight `name`: its input width a multiple of the block,
/// its values finite.
pub(crate) fn int8_weight(name: &str, w: &Tensor) -> Result<Int8Weight> {
    let width = w.dim(1)?;
    if width % BLOCK != 0 {
        return Err(Error::Invalid(format!(
            "matmul weights \"int8\": `{name}` has input width {width}, not a multiple of the \
             {BLOCK}-weight block; use \"dense\""
        )));
    }
    Int8Weight::quantize(&finite_f32(name, w, w.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    fn tiny(tied: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 40,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: tied,
            attention_bias: false,
            bos_token_id: 1,
            eos_token_id: 2,
            pad_token_id: 0,
        }
    }

    /// 16 positions: the few-row path (`kernels::decode::SKINNY_ROWS`) for both models.
    fn ids() -> Result<Tensor> {
        let v: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % 40).collect();
        Ok(Tensor::from_vec(v, (2, 8), &Device::Cpu)?)
    }

    /// The int8 forward computes with exactly the weights `tensors()` reports (the
    /// dequantized ones): the dense model built from them gives the same logits bit for
    /// bit on the fused kernels (untied), the plain kernels agree within rounding, and
    /// all stay close to the f32 model.
    #[test]
    fn int8_logits_are_the_dense_logits_of_the_dequantized_weights() -> Result<()> {
        for tied in [false, true] {
            let dense = Llama::init(tiny(tied), 0.2, 3, &Device::Cpu)?;
            let want = dense.forward(&ids()?)?;
            let q = Llama::init(tiny(tied), 0.2, 3, &Device::Cpu)?.with_matmul_weights(MatmulWeights::Int8)?;
            assert_eq!(q.matmul_weights(), MatmulWeights::Int8);
            assert!(q.is_frozen());
            let got = q.forward(&ids()?)?;
            let rel = ((&got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?
                / want.sqr()?.sum_all()?.to_scalar::<f32>()?)
            .sqrt();
            assert!(rel < 0.05, "tied {tied}: relative L2 error {rel}");
            let again = Llama::from_tensors(q.cfg.clone(), q.tensors()?, &Device::Cpu)?;
            let flat = |t: Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            if !tied {
                // (Tied, the dense table stays the lookup's and the head has its own int8 copy.)
                assert_eq!(flat(again.forward(&ids()?)?)?, flat(got.clone())?);
            }
            let mut plain = Llama::init(tiny(tied), 0.2, 3, &Device::Cpu)?.with_matmul_weights(MatmulWeights::Int8)?;
            plain.set_kernels(crate::config::Kernels::Plain);
            let diff = (plain.forward(&ids()?)? - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "tied {tied}: plain vs fused {diff}");
            let head = q.lm_head_weight()?;
            let blocks = q.quantized[q.head_name()].dequantize(&Device::Cpu)?;
            assert_eq!(head.to_vec2::<f32>()?, blocks.to_vec2::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn widths_off_the_block_and_other_dtypes_are_refused() -> Result<()> {
        let mut cfg = tiny(false);
        cfg.intermediate_size = 40; // down_proj's input width is not a multiple of 32
        let err = Llama::init(cfg, 0.2, 3, &Device::Cpu)?
            .with_matmul_weights(MatmulWeights::Int8)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("down_proj") && e.contains("dense")),
            "{err:?}"
        );
        let mut m = Llama::init(tiny(false), 0.2, 3, &Device::Cpu)?;
        m.set_compute_dtype(DType::BF16)?;
        assert!(m.with_matmul_weights(MatmulWeights::Int8).is_err());
        let dense = Llama::init(tiny(false), 0.2, 3, &Device::Cpu)?.with_matmul_weights(MatmulWeights::Dense)?;
        assert_eq!(dense.matmul_weights(), MatmulWeights::Dense);
        assert!(!dense.is_frozen());
        Ok(())
    }
}
