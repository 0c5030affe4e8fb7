//! The offline logit cache: the teacher's top-k log-probabilities for every position a
//! student's loss counts, written once, so that a student stage (or many: a sweep over
//! divergences, students or seeds) distils without running the teacher again.
//!
//! Layout of a cache directory:
//!
//! ```text
//! index.json                  what was cached, from what, and where (written last)
//! shard-00000.safetensors     indices (R, k) U32, log_probs (R, k) F32
//! shard-00001.safetensors     ...
//! ```
//!
//! Rows follow the dataset: example after example, and inside an example the positions
//! whose target is a completion token (the positions `data::batch::make_batch` masks
//! in), in order. An example with ids of length n and prompt length p has n - p rows.
//! `index.json` records the shards with the examples they hold and their SHA-256, the
//! teacher's content id, a fingerprint of the tokenised dataset, k, the temperature at
//! which the log-probabilities were taken, and the storage cost per token. A reader
//! refuses a cache whose fingerprint, k or temperature differ from what the stage
//! expects, instead of distilling from the logits of other data.
//!
//! `log_probs` are `log softmax(teacher / T)` at the distillation temperature T, so the
//! student's loss needs nothing else (`loss::topk` explains the treatment of the mass
//! outside the top k). Storage is 8 bytes per token per k (u32 id + f32 log-prob).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsio::{check_safetensors_header, sha256_hex, write_file_atomic};
use crate::loss::topk::{top_k_of_logits, TopK};
use crate::model::Llama;
use crate::prepare::data::batch::{make_batch, Encoded};

const FORMAT: &str = "distill-logit-cache";
const VERSION: u32 = 1;
const INDEX: &str = "index.json";
/// Rows per shard: 2^20 rows at k = 8 is a 64 MiB shard.
const ROWS_PER_SHARD: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format: String,
    pub version: u32,
    /// Content id of the teacher checkpoint (`checkpoint::content_id`).
    pub teacher: String,
    /// SHA-256 over the tokenised dataset (`fingerprint`).
    pub data_fingerprint: String,
    pub k: usize,
    pub temperature: f64,
    pub vocab_size: usize,
    pub examples: usize,
    /// Positions cached (= tokens the student's loss counts).
    pub rows: usize,
    /// Bytes of the shard files.
    pub bytes: u64,
    pub bytes_per_token: f64,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// A file name inside the cache directory (no separators).
    pub file: String,
    pub first_example: usize,
    pub examples: usize,
    pub rows: usize,
    pub sha256: String,
}

/// What a stage expects of a cache; a cache that differs is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    /// The teacher's content id (`checkpoint::content_id`): a cache of other weights is refused.
    pub teacher: String,
    pub data_fingerprint: String,
    pub k: usize,
    pub temperature: f64,
    pub vocab_size: usize,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Rows an example contributes: its completion targets.
fn rows_of(e: &Encoded) -> usize {
    e.ids.len() - e.prompt_len
}

/// SHA-256 over the ids and prompt lengths of a tokenised dataset, in order.
pub fn fingerprint(data: &[Encoded]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for e in data {
        h.update((e.ids.len() as u64).to_le_bytes());
        h.update((e.prompt_len as u64).to_le_bytes());
        for id in &e.ids {
            h.update(id.to_le_bytes());
        }
    }
    format!(
        "sha256:{}",
        h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Runs the teacher over `data` in batches of `batch_size` examples and writes the cache
/// into `dir` (created; files in it are replaced). Returns the index and the teacher's
/// forward FLOPs. `progress(done, total)` is called after each batch.
pub fn write(
    dir: &Path,
    teacher: &Llama,
    data: &[Encoded],
    expect: &Expect,
    batch_size: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<(Index, f64)> {
    prepare(dir, data)?;
    let part = write_part(dir, teacher, data, 0..data.len(), "", expect, batch_size, progress)?;
    let index = write_index(dir, data, expect, part.shards)?;
    Ok((index, part.flops))
}

/// The shards one writer (one rank of a data-parallel job) wrote, in example order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Part {
    pub shards: Vec<ShardEntry>,
    pub flops: f64,
}

/// Makes `dir` ready for writers: created, with no index left from an earlier cache (a
/// stale index must not describe new shards while they are written).
pub fn prepare(dir: &Path, data: &[Encoded]) -> Result<()> {
    if data.is_empty() {
        return Err(bad(dir, "no examples to cache"));
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let index_path = dir.join(INDEX);
    if index_path.exists() {
        std::fs::remove_file(&index_path).at(&index_path)?;
    }
    Ok(())
}

/// Writes the rows of `data[range]` (example indices stay global) to shards named
/// `shard-<tag>NNNNN.safetensors`; the ranks of a job write their ranges at once with
/// distinct tags, and one of them then writes the index over all parts (`write_index`).
#[allow(clippy::too_many_arguments)]
pub fn write_part(
    dir: &Path,
    teacher: &Llama,
    data: &[Encoded],
    range: std::ops::Range<usize>,
    tag: &str,
    expect: &Expect,
    batch_size: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<Part> {
    std::fs::create_dir_all(dir).at(dir)?;
    let k = expect.k;
    let pad = teacher.cfg.pad_token_id;
    let mut flops = 0.0;
    let mut shards = Vec::new();
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    let (mut shard_first, mut shard_rows) = (range.start, 0usize);
    let mut flush = |first: usize, end: usize, rows: usize, ids: &mut Vec<u32>, lps: &mut Vec<f32>| -> Result<()> {
        let file = format!("shard-{tag}{:05}.safetensors", shards.len());
        let path = dir.join(&file);
        write_shard(&path, ids, lps, rows, k)?;
        shards.push(ShardEntry {
            file,
            first_example: first,
            examples: end - first,
            rows,
            sha256: sha256_hex(&path)?,
        });
        ids.clear();
        lps.clear();
        Ok(())
    };
    let bs = batch_size.max(1);
    let mine = &data[range.clone()];
    for (b, chunk) in mine.chunks(bs).enumerate() {
        let items: Vec<&Encoded> = chunk.iter().collect();
        let batch = make_batch(&items, pad, teacher.device())?;
        let (_, t) = batch.inputs.dims2()?;
        let logits = teacher.forward(&batch.inputs)?.flatten_to(1)?; // (B*T, V)
        flops += teacher.cfg.forward_flops_per_token(t) * batch.positions as f64;
        let top = top_k_of_logits(&logits, k, expect.temperature)?;
        let all_ids = top.indices.flatten_all()?.to_vec1::<u32>()?;
        let all_lps = top.log_probs.flatten_all()?.to_vec1::<f32>()?;
        for (r, e) in chunk.iter().enumerate() {
            let ex = range.start + b * bs + r;
            // Rows of this example in the batch: positions prompt_len - 1 .. n - 1.
            let from = (r * t + e.prompt_len - 1) * k;
            let to = (r * t + e.ids.len() - 1) * k;
            ids.extend_from_slice(&all_ids[from..to]);
            lps.extend_from_slice(&all_lps[from..to]);
            shard_rows += rows_of(e);
            if shard_rows >= ROWS_PER_SHARD {
                flush(shard_first, ex + 1, shard_rows, &mut ids, &mut lps)?;
                shard_first = ex + 1;
                shard_rows = 0;
            }
        }
        progress(((b + 1) * bs).min(mine.len()), mine.len());
    }
    if shard_rows > 0 {
        flush(shard_first, range.end, shard_rows, &mut ids, &mut lps)?;
    }
    Ok(Part { shards, flops })
}

/// Writes `index.json` over `shards` (every part, in example order), last, atomically.
pub fn write_index(dir: &Path, data: &[Encoded], expect: &Expect, shards: Vec<ShardEntry>) -> Result<Index> {
    let index_path = dir.join(INDEX);
    let mut bytes = 0u64;
    for s in &shards {
        let p = dir.join(&s.file);
        bytes += std::fs::metadata(&p).at(&p)?.len();
    }
    let rows: usize = data.iter().map(rows_of).sum();
    let index = Index {
        format: FORMAT.into(),
        version: VERSION,
        teacher: expect.teacher.clone(),
        data_fingerprint: expect.data_fingerprint.clone(),
        k: expect.k,
        temperature: expect.temperature,
        vocab_size: expect.vocab_size,
        examples: data.len(),
        rows,
        bytes,
        bytes_per_token: bytes as f64 / rows.max(1) as f64,
        shards,
    };
    let json = serde_json::to_vec_pretty(&index).map_err(|e| bad(&index_path, e.to_string()))?;
    write_file_atomic(&index_path, &json)?;
    if let Err(e) = remove_unlisted_shards(dir, &index) {
        // The cache is complete and valid: leftovers cost disk, not correctness.
        eprintln!(
            "warning: logit cache {}: could not delete an old shard: {e}",
            dir.display()
        );
    }
    Ok(index)
}

/// Deletes the shard files in `dir` that `index` does not list: those of an earlier cache
/// written there with more shards or by other ranks. Only names of the form
/// `shard-*.safetensors` are touched, and only once the new index is on disk, so a crash
/// before this leaves garbage, never a cache without its shards. Stops at the first
/// failure (the caller warns and goes on).
fn remove_unlisted_shards(dir: &Path, index: &Index) -> Result<()> {
    let listed: std::collections::HashSet<&str> = index.shards.iter().map(|s| s.file.as_str()).collect();
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("shard-") && name.ends_with(".safetensors");
        if ours && !listed.contains(name) && entry.file_type().at(dir)?.is_file() {
            let path = entry.path();
            std::fs::remove_file(&path).at(&path)?;
        }
    }
    Ok(())
}

fn write_shard(path: &Path, ids: &[u32], lps: &[f32], rows: usize, k: usize) -> Result<()> {
    use safetensors::tensor::TensorView;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    let lp_bytes: Vec<u8> = lps.iter().flat_map(|x| x.to_le_bytes()).collect();
    let tensors = [
        (
            "indices",
            TensorView::new(safetensors::Dtype::U32, vec![rows, k], &id_bytes),
        ),
        (
            "log_probs",
            TensorView::new(safetensors::Dtype::F32, vec![rows, k], &lp_bytes),
        ),
    ]
    .into_iter()
    .map(|(n, v)| {
        v.map(|v| (n.to_string(), v))
            .map_err(|e| bad(path, format!("cannot build tensor {n}: {e}")))
    })
    .collect::<Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(|e| bad(path, format!("cannot serialise: {e}")))?;
    write_file_atomic(path, &bytes)
}

/// Reads `index.json` alone (small, size-checked): enough to tell whether a cache is
/// complete and what it holds.
pub fn read_index(dir: &Path) -> Result<Index> {
    let path = dir.join(INDEX);
    let len = std::fs::metadata(&path).at(&path)?.len();
    if len > 64 << 20 {
        return Err(bad(&path, format!("{len} bytes is too large for a cache index")));
    }
    let text = std::fs::read_to_string(&path).at(&path)?;
    let index: Index = serde_json::from_str(&text).map_err(|e| bad(&path, format!("not a logit-cache index: {e}")))?;
    if index.format != FORMAT || index.version != VERSION {
        return Err(bad(
            &path,
            format!(
                "format {} version {} is not {FORMAT} version {VERSION}; rebuild the cache with this version",
                index.format, index.version
            ),
        ));
    }
    for s in &index.shards {
        // The index names files inside its own directory, never a path elsewhere.
        let plain = !s.file.is_empty()
            && s.file != "."
            && s.file != ".."
            && !s.file.contains(['/', '\\'])
            && Path::new(&s.file).components().count() == 1;
        if !plain {
            return Err(bad(
                &path,
                format!(
                    "shard file {:?} is not a plain file name inside the cache directory",
                    s.file
                ),
            ));
        }
    }
    Ok(index)
}

/// A cache in memory, checked against what the stage expects.
pub struct LogitCache {
    dir: PathBuf,
    pub index: Index,
    /// Row offset of each example, and one past the last: `offsets[e]..offsets[e + 1]`.
    offsets: Vec<usize>,
    /// Batch position of each example's first counted row (its prompt length - 1).
    first_pos: Vec<usize>,
    indices: Vec<u32>,
    log_probs: Vec<f32>,
}

impl LogitCache {
    /// Opens the cache in `dir` for `data`: the index must match `expect`, every shard
    /// its checksum and shape, and every row must be a valid top-k teacher (ids inside
    /// the vocabulary and distinct, log-probabilities <= 0 summing to at most 1).
    pub fn open(dir: &Path, data: &[Encoded], expect: &Expect) -> Result<Self> {
        let index = read_index(dir)?;
        let path = dir.join(INDEX);
        let mismatch = |what: &str, got: String, want: String| {
            bad(
                &path,
                format!(
                    "{what} is {got}, but this stage needs {want}; delete {} to rebuild it",
                    dir.display()
                ),
            )
        };
        if index.teacher != expect.teacher {
            return Err(mismatch(
                "the teacher's content id",
                index.teacher.clone(),
                format!("{} (another teacher's weights)", expect.teacher),
            ));
        }
        if index.data_fingerprint != expect.data_fingerprint {
            return Err(mismatch(
                "the dataset fingerprint",
                index.data_fingerprint.clone(),
                expect.data_fingerprint.clone(),
            ));
        }
        if index.k != expect.k || index.k == 0 {
            return Err(mismatch("k", index.k.to_string(), expect.k.to_string()));
        }
        if index.temperature != expect.temperature {
            return Err(mismatch(
                "the temperature",
                index.temperature.to_string(),
                expect.temperature.to_string(),
            ));
        }
        if index.vocab_size != expect.vocab_size {
            return Err(mismatch(
                "the vocabulary size",
                index.vocab_size.to_string(),
                expect.vocab_size.to_string(),
            ));
        }
        let mut offsets = Vec::with_capacity(data.len() + 1);
        offsets.push(0);
        for e in data {
            offsets.push(offsets[offsets.len() - 1] + rows_of(e));
        }
        let rows = offsets[data.len()];
        if index.rows != rows || index.examples != data.len() {
            return Err(mismatch(
                "the size",
                format!("{} examples / {} rows", index.examples, index.rows),
                format!("{} / {rows}", data.len()),
            ));
        }
        let k = index.k;
        let (mut indices, mut log_probs) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
        let mut next_example = 0;
        for s in &index.shards {
            let p = dir.join(&s.file);
            // Checked: a hostile index may give any counts.
            let end = s.first_example.checked_add(s.examples);
            let want_rows = end
                .and_then(|end| offsets.get(end))
                .zip(offsets.get(s.first_example))
                .map(|(b, a)| b - a);
            if s.first_example != next_example || want_rows != Some(s.rows) {
                return Err(bad(
                    &path,
                    format!(
                        "shard {} covers examples {}..{} with {} rows, which does not follow the previous shard and the dataset",
                        s.file,
                        s.first_example,
                        s.first_example.saturating_add(s.examples),
                        s.rows
                    ),
                ));
            }
            next_example += s.examples; // <= data.len(): `end` was found in `offsets`
            check_safetensors_header(&p)?;
            if sha256_hex(&p)? != s.sha256 {
                return Err(bad(
                    &p,
                    "does not match the checksum in index.json (the file is damaged); delete the cache to rebuild it",
                ));
            }
            let bytes = std::fs::read(&p).at(&p)?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| bad(&p, format!("not a valid safetensors file: {e}")))?;
            let get = |name: &str, dtype: safetensors::Dtype| -> Result<Vec<u8>> {
                let t = st.tensor(name).map_err(|e| bad(&p, format!("tensor {name}: {e}")))?;
                if t.dtype() != dtype || t.shape() != [s.rows, k] {
                    return Err(bad(
                        &p,
                        format!(
                            "tensor {name} is {:?} {:?}, expected {dtype:?} [{}, {k}]",
                            t.dtype(),
                            t.shape(),
                            s.rows
                        ),
                    ));
                }
                Ok(t.data().to_vec())
            };
            let ids = get("indices", safetensors::Dtype::U32)?;
            let lps = get("log_probs", safetensors::Dtype::F32)?;
            let first_row = indices.len() / k;
            indices.extend(
                ids.chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            log_probs.extend(
                lps.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            check_rows(
                &p,
                &indices[first_row * k..],
                &log_probs[first_row * k..],
                k,
                index.vocab_size,
            )?;
        }
        if next_example != data.len() {
            return Err(bad(
                &path,
                format!("the shards cover {next_example} of {} examples", data.len()),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            offsets,
            first_pos: data.iter().map(|e| e.prompt_len - 1).collect(),
            indices,
            log_probs,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The teacher side of a padded batch of the examples `items` (indices into the
    /// dataset the cache was opened with), laid out like `make_batch`'s rows: (B * t, k).
    /// Rows the loss does not count get a harmless placeholder (the first k ids at equal
    /// log-probabilities, half the mass in the tail), which keeps every divergence finite
    /// so that `loss * mask` stays 0 there.
    pub fn batch(&self, items: &[usize], t: usize, device: &Device) -> Result<TopK> {
        let k = self.index.k;
        let filler_lp = (0.5 / k as f64).ln() as f32;
        let mut ids = Vec::with_capacity(items.len() * t * k);
        let mut lps = Vec::with_capacity(items.len() * t * k);
        for &e in items {
            let (a, b) = match (self.offsets.get(e), self.offsets.get(e + 1)) {
                (Some(&a), Some(&b)) => (a, b),
                _ => {
                    return Err(Error::Invalid(format!(
                        "logit cache {}: example {e} is not in the cache of {} examples",
                        self.dir.display(),
                        self.index.examples
                    )))
                }
            };
            // The counted positions of the example's batch row: first .. first + (b - a).
            let first = self.first_pos[e];
            for pos in 0..t {
                if pos >= first && pos < first + (b - a) {
                    let r = a + pos - first;
                    ids.extend_from_slice(&self.indices[r * k..(r + 1) * k]);
                    lps.extend_from_slice(&self.log_probs[r * k..(r + 1) * k]);
                } else {
                    ids.extend(0..k as u32);
                    lps.extend(std::iter::repeat_n(filler_lp, k));
                }
            }
        }
        let rows = items.len() * t;
        Ok(TopK {
            indices: Tensor::from_vec(ids, (rows, k), device)?,
            log_probs: Tensor::from_vec(lps, (rows, k), device)?,
        })
    }
}

/// Checks the rows of one shard; errors name the shard and the row.
fn check_rows(path: &Path, ids: &[u32], lps: &[f32], k: usize, vocab: usize) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for (r, (ri, rl)) in ids.chunks_exact(k).zip(lps.chunks_exact(k)).enumerate() {
        seen.clear();
        let mut mass = 0f64;
        for (&i, &l) in ri.iter().zip(rl) {
            if i as usize >= vocab {
                return Err(bad(
                    path,
                    format!("row {r}: token id {i} is outside the vocabulary of {vocab}"),
                ));
            }
            if !seen.insert(i) {
                return Err(bad(path, format!("row {r}: token id {i} is listed twice")));
            }
            if l.is_nan() || l > 1e-4 {
                return Err(bad(path, format!("row {r}: log-probability {l} is not <= 0")));
            }
            mass += (l as f64).exp();
        }
        if mass > 1.0 + 1e-3 {
            return Err(bad(path, format!("row {r}: probabilities sum to {mass}, more than 1")));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ModelSpec;
    use crate::model::ModelConfig;

    const V: usize = 50;

    fn teacher() -> Llama {
        let spec = ModelSpec {
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 1,
            num_heads: 2,
            max_position_embeddings: 32,
            ..ModelSpec::default()
        };
        Llama::init(ModelConfig::from_spec(&spec, V, 1, 2, 0), 0.5, 3, &Device::Cpu).unwrap()
    }

    /// Examples of different lengths and prompt lengths.
    fn data() -> Vec<Encoded> {
        (0..7)
            .map(|i| {
                let len = 4 + (i * 5) % 9;
                Encoded {
                    ids: (0..len).map(|j| ((i * 13 + j * 7) % (V - 3) + 3) as u32).collect(),
                    prompt_len: 1 + i % 3,
                }
            })
            .collect()
    }

    fn expect(data: &[Encoded]) -> Expect {
        Expect {
            teacher: "sha256:test".into(),
            data_fingerprint: fingerprint(data),
            k: 5,
            temperature: 2.0,
            vocab_size: V,
        }
    }

    #[test]
    fn cached_rows_equal_the_online_top_k_on_counted_positions() -> Result<()> {
        let (dir, model, data) = (tempfile::tempdir().unwrap(), teacher(), data());
        let (index, flops) = write(dir.path(), &model, &data, &expect(&data), 3, &|_, _| {})?;
        assert!(flops > 0.0);
        assert_eq!(index.rows, data.iter().map(rows_of).sum::<usize>());
        // 8 bytes per k per row, plus the shard headers.
        assert!(
            index.bytes_per_token >= 40.0 && index.bytes_per_token < 80.0,
            "{}",
            index.bytes_per_token
        );
        let cache = LogitCache::open(dir.path(), &data, &expect(&data))?;
        // Batches in another grouping than the one the cache was written with.
        for items in [vec![4usize, 0, 6], vec![2], vec![5, 1, 3]] {
            let refs: Vec<&Encoded> = items.iter().map(|&i| &data[i]).collect();
            let b = make_batch(&refs, 0, &Device::Cpu)?;
            let (_, t) = b.inputs.dims2()?;
            let online = top_k_of_logits(&model.forward(&b.inputs)?.flatten_to(1)?, 5, 2.0)?;
            let cached = cache.batch(&items, t, &Device::Cpu)?;
            let mask = b.mask.to_vec1::<f32>()?;
            let (oi, ci) = (online.indices.to_vec2::<u32>()?, cached.indices.to_vec2::<u32>()?);
            let (ol, cl) = (online.log_probs.to_vec2::<f32>()?, cached.log_probs.to_vec2::<f32>()?);
            for r in 0..mask.len() {
                if mask[r] == 1.0 {
                    assert_eq!(oi[r], ci[r], "row {r} of batch {items:?}");
                    for (a, b) in ol[r].iter().zip(&cl[r]) {
                        assert!((a - b).abs() <= 1e-5, "row {r}: {a} vs {b}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Rewriting a cache deletes the shards the new index does not list (an earlier
    /// writer's), and nothing else.
    #[test]
    fn a_rewritten_cache_leaves_no_old_shards() -> Result<()> {
        let (dir, model, data) = (tempfile::tempdir().unwrap(), teacher(), data());
        let old = dir.path().join("shard-r1-00000.safetensors"); // as rank 1 of an earlier job wrote
        let mine = dir.path().join("notes.txt");
        std::fs::write(&old, b"stale").unwrap();
        std::fs::write(&mine, b"the user's").unwrap();
        let (index, _) = write(dir.path(), &model, &data, &expect(&data), 3, &|_, _| {})?;
        assert!(!old.exists() && mine.exists());
        for s in &index.shards {
            assert!(dir.path().join(&s.file).exists(), "{}", s.file);
        }
        LogitCache::open(dir.path(), &data, &expect(&data))?;
        Ok(())
    }

    #[test]
    fn damaged_or_foreign_caches_are_refused_with_the_reason() -> Result<()> {
        let (dir, model, data) = (tempfile::tempdir().unwrap(), teacher(), data());
        write(dir.path(), &model, &data, &expect(&data), 4, &|_, _| {})?;
        let open_err = |e: &Expect| LogitCache::open(dir.path(), &data, e).err().map(|e| e.to_string());
        let mut other = expect(&data);
        other.k = 6;
        assert!(open_err(&other).unwrap().contains("k is 5"));
        other = expect(&data);
        other.temperature = 1.0;
        assert!(open_err(&other).unwrap().contains("temperature"));
        let fewer = &data[..6];
        let e = LogitCache::open(dir.path(), fewer, &expect(fewer))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("fingerprint") && e.contains("delete"), "{e}");

        // A flipped byte in a shard fails its checksum.
        let shard = dir.path().join("shard-00000.safetensors");
        let good = std::fs::read(&shard).unwrap();
        let mut bad_bytes = good.clone();
        let last = bad_bytes.len() - 3;
        bad_bytes[last] ^= 0x40;
        std::fs::write(&shard, &bad_bytes).unwrap();
        assert!(open_err(&expect(&data)).unwrap().contains("checksum"));
        std::fs::write(&shard, &good).unwrap();

        // An index naming a file outside the directory is refused before anything is read.
        let ip = dir.path().join(INDEX);
        let text = std::fs::read_to_string(&ip).unwrap();
        std::fs::write(&ip, text.replace("shard-00000.safetensors", "../../etc/passwd")).unwrap();
        assert!(open_err(&expect(&data)).unwrap().contains("plain file name"));
        std::fs::write(&ip, &text).unwrap();
        assert!(open_err(&expect(&data)).is_none());
        Ok(())
    }
}
