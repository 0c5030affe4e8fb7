//! Tokenizers through the `tokenizers` crate: train a byte-level BPE on the run's
//! text, or load any `tokenizer.json`; saved beside every checkpoint so that a
//! checkpoint directory stands on its own.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::error::{Error, Result};

pub const PAD: &str = "<|pad|>";
pub const BOS: &str = "<|bos|>";
pub const EOS: &str = "<|eos|>";

/// End-of-sequence names used by common model families, tried in order when a
/// loaded tokenizer lacks ours.
const EOS_ALIASES: &[&str] = &[EOS, "<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>", "<eos>"];
const BOS_ALIASES: &[&str] = &[BOS, "<|im_start|>", "<s>", "<|begin_of_text|>", "<bos>"];
const PAD_ALIASES: &[&str] = &[PAD, "<pad>", "<|finetune_right_pad_id|>"];

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
}

impl Tokenizer {
    /// Trains a byte-level BPE with single-digit number tokens (which makes
    /// arithmetic learnable) on `texts`.
    pub fn train<'a>(texts: impl Iterator<Item = &'a str> + Send, vocab_size: usize) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        let pre: Vec<PreTokenizerWrapper> = vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()];
        inner.with_pre_tokenizer(Some(Sequence::new(pre)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials = [PAD, BOS, EOS].map(|s| AddedToken::from(s, true)).to_vec();
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        inner
            .train(&mut trainer, texts)
            .map_err(|e| Error::Tokenizer(format!("training failed: {e}")))?;
        Self::wrap(inner)
    }

    /// Loads a `tokenizer.json`. The special tokens are those a `tokenizer_config.json`
    /// beside it names (`bos_token`, `eos_token`, `pad_token`, as Hugging Face and our
    /// checkpoints write them), else the first of the usual names found in the vocabulary.
    /// (SmolLM2's vocabulary has both `<|endoftext|>` and its real end of turn,
    /// `<|im_end|>`: only the config tells them apart.)
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a valid tokenizer.json: {msg}"),
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        // The JSON's syntax is checked first: tokenizers 0.23 panics (`expect("Helper")`)
        // instead of returning an error on some malformed decoders. A panic it still
        // raises on a well-formed file becomes an error too.
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| bad("the tokenizers crate failed on it (a panic)".into()))?;
        let inner = parsed.map_err(|e| bad(e.to_string()))?;
        // The config's names come first; the usual names are only a fallback, so a
        // vocabulary with none of them still loads when the config names its tokens.
        let config = path.with_file_name("tokenizer_config.json");
        let (mut bos, mut eos, mut pad) = (None, None, None);
        if config.is_file() {
            // Present but unreadable (not UTF-8, say) is an error, not a file to skip.
            let text = std::fs::read_to_string(&config).map_err(|e| Error::Checkpoint {
                path: config.clone(),
                msg: format!("cannot be read as text: {e}"),
            })?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: config.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
            if !json.is_object() {
                return Err(Error::Checkpoint {
                    path: config.clone(),
                    msg: "must be a JSON object {\"key\": value, ...}".into(),
                });
            }
            // A token is its text, or an AddedToken object with the text in "content";
            // absent or null means "not named here". Any other type is an error, not a
            // silent fallback to the usual names.
            let named = |key: &str| -> Result<Option<u32>> {
                let name = match &json[key] {
                    serde_json::Value::Null => return Ok(None),
                    serde_json::Value::String(s) => Some(s.as_str()),
                    serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
                    _ => None,
                };
                let name = name.ok_or_else(|| Error::Checkpoint {
                    path: config.clone(),
                    msg: format!(
                        "key `{key}` must be the token's text (a string), an object with its text in \"content\", \
                         or null; found {}",
                        json[key].to_string().chars().take(60).collect::<String>()
                    ),
                })?;
                inner.token_to_id(name).map(Some).ok_or_else(|| Error::Checkpoint {
                    path: config.clone(),
                    msg: format!("{key} {name:?} is not in the vocabulary of tokenizer.json"),
                })
            };
            (bos, eos, pad) = (named("bos_token")?, named("eos_token")?, named("pad_token")?);
        }
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos = eos.or_else(|| find(EOS_ALIASES)).ok_or_else(|| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!(
                "no end-of-sequence token: {} names no eos_token and the vocabulary has none of {EOS_ALIASES:?}; \
                 add \"eos_token\" to tokenizer_config.json beside it",
                config.display()
            ),
        })?;
        let bos = bos.or_else(|| find(BOS_ALIASES)).unwrap_or(eos);
        let pad = pad.or_else(|| find(PAD_ALIASES)).unwrap_or(eos);
        Ok(Self { inner, bos, eos, pad })
    }

    /// Wraps a `tokenizers::Tokenizer` built elsewhere (e.g. from GGUF metadata,
    /// `model::gguf`) with the special-token ids its source declares, each
    /// checked to be in the vocabulary.
    pub fn from_parts(inner: tokenizers::Tokenizer, bos: u32, eos: u32, pad: u32) -> Result<Self> {
        for (what, id) in [("bos", bos), ("eos", eos), ("pad", pad)] {
            if inner.id_to_token(id).is_none() {
                return Err(Error::Tokenizer(format!(
                    "{what} token id {id} is not in the vocabulary of {} tokens",
                    inner.get_vocab_size(true)
                )));
            }
        }
        Ok(Self { inner, bos, eos, pad })
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Result<Self> {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos = find(EOS_ALIASES)
            .ok_or_else(|| Error::Tokenizer(format!("no end-of-sequence token (looked for {EOS_ALIASES:?})")))?;
        let bos = find(BOS_ALIASES).unwrap_or(eos);
        let pad = find(PAD_ALIASES).unwrap_or(eos);
        Ok(Self { inner, bos, eos, pad })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer(format!("cannot write {}: {e}", path.display())))
    }

    /// The text of a token id.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Hugging Face `tokenizer_config.json`, so that `AutoTokenizer` loads the
    /// directory as a fast tokenizer with our special tokens.
    pub fn hf_config(&self, model_max_length: usize) -> serde_json::Value {
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token(self.bos),
            "eos_token": self.token(self.eos),
            "pad_token": self.token(self.pad),
            "add_bos_token": false,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
        })
    }

    /// Token text -> id, special tokens included.
    pub fn vocab_map(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    /// Vocabulary size including special tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `[bos]` and the ids of `prompt`: what every model here reads before a completion.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos];
        ids.extend(self.encode(prompt)?);
        Ok(ids)
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_saves_and_reloads() -> Result<()> {
        let texts = [
            "Tom has 12 apples.",
            "He buys 5 more.\n12 + 5 = 17\n#### 17",
            "Ann has 3 pears.",
        ];
        let tok = Tokenizer::train(texts.iter().copied().cycle().take(60), 300)?;
        let ids = tok.encode("Tom has 125 apples.\n#### 17")?;
        assert_eq!(tok.decode(&ids)?, "Tom has 125 apples.\n#### 17");
        // Digits are single tokens, so "125" is three of them.
        let digits = tok.encode("125")?;
        assert_eq!(digits.len(), 3);
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let path = dir.path().join("tokenizer.json");
        tok.save(&path)?;
        let again = Tokenizer::load(&path)?;
        assert_eq!(again.encode("Tom has 125 apples.")?, tok.encode("Tom has 125 apples.")?);
        assert_eq!((again.bos, again.eos, again.pad), (tok.bos, tok.eos, tok.pad));
        assert_ne!(tok.eos, tok.pad);
        Ok(())
    }

    /// The special tokens come from tokenizer_config.json when it names them, not from
    /// the first usual name in the vocabulary (SmolLM2 has `<|endoftext|>` and ends turns
    /// with `<|im_end|>`); a name missing from the vocabulary is an error naming the file.
    #[test]
    fn special_tokens_follow_tokenizer_config() -> Result<()> {
        let texts = ["Tom has 12 apples.", "Ann has 3 pears."];
        let tok = Tokenizer::train(texts.iter().copied().cycle().take(40), 300)?;
        // End sequences with the pad token, which the name search would not pick.
        let odd = Tokenizer::from_parts(tok.inner.clone(), tok.bos, tok.pad, tok.pad)?;
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let path = dir.path().join("tokenizer.json");
        odd.save(&path)?;
        assert_eq!(
            Tokenizer::load(&path)?.eos,
            tok.eos,
            "without a config: the name search"
        );
        let config = dir.path().join("tokenizer_config.json");
        let write =
            |v: serde_json::Value| std::fs::write(&config, v.to_string()).map_err(|e| Error::Invalid(e.to_string()));
        write(odd.hf_config(64))?;
        let again = Tokenizer::load(&path)?;
        assert_eq!((again.bos, again.eos, again.pad), (tok.bos, tok.pad, tok.pad));
        write(serde_json::json!({"eos_token": {"content": "<|nope|>"}}))?;
        let err = Tokenizer::load(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("<|nope|>"),
            "{err}"
        );
        Ok(())
    }

    /// A vocabulary with none of the usual special-token names loads when
    /// tokenizer_config.json names its end-of-sequence token, and without the config
    /// the error says to add it.
    #[test]
    fn a_vocabulary_without_usual_names_loads_from_its_config() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let path = dir.path().join("tokenizer.json");
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "<stop>": 2}, "unk_token": "a"}
        });
        std::fs::write(&path, json.to_string()).map_err(|e| Error::Invalid(e.to_string()))?;
        let err = Tokenizer::load(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("eos_token") && err.contains("tokenizer_config.json"),
            "{err}"
        );
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": "<stop>"}"#)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let tok = Tokenizer::load(&path)?;
        assert_eq!((tok.bos, tok.eos, tok.pad), (2, 2, 2));
        assert_eq!(tok.encode("a b")?, vec![0, 1]);
        Ok(())
    }

    #[test]
    fn garbage_file_is_a_clear_error() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, b"{\"model\": 3").map_err(|e| Error::Invalid(e.to_string()))?;
        let err = Tokenizer::load(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("tokenizer.json"), "{err}");
        Ok(())
    }
}
