//! Models from the Hugging Face Hub, by id and revision, through the `hf-hub` crate's
//! cache layout (`$HF_HOME/hub/models--ORG--NAME/{refs,snapshots,blobs}`, the layout
//! `huggingface_hub` in Python shares).
//!
//! A file already in the cache is used as it is. A missing one is downloaded, unless
//! `HF_HUB_OFFLINE=1` (the same switch as Python's), in which case the error names the
//! file, the cache folder and the ways out. These machines cannot reach the Hub, so the
//! tests build a cache folder themselves and resolve from it.
//!
//! Everything that becomes part of a path is checked first: the repo id (`ORG/NAME`),
//! the revision, the commit hash a `refs/` file holds, and the shard names a
//! `model.safetensors.index.json` lists. None of them can point outside the cache.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::config::{check_repo_id, check_revision};
use crate::error::{Error, Result};

/// The files a model directory needs besides its weights.
const MODEL_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// A sharded checkpoint's index (Hugging Face's name for it).
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// A file name inside a model folder: no separators, not `.` or `..`.
pub fn check_plain_file(name: &str, listed_in: &Path) -> Result<()> {
    if !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']) {
        Ok(())
    } else {
        Err(Error::Checkpoint {
            path: listed_in.to_path_buf(),
            msg: format!("lists the file {name:?}, which is not a plain file name in the model's folder"),
        })
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
}

/// Resolves `id` at `revision` to a local folder holding `config.json`,
/// `tokenizer.json` and the weights (`model.safetensors`, or the index and its
/// shards), from the cache that `HF_HOME` names (default `~/.cache/huggingface`).
pub fn resolve(id: &str, revision: &str) -> Result<PathBuf> {
    resolve_in(&Cache::from_env(), id, revision, offline())
}

/// `resolve` with an explicit cache and offline switch.
pub fn resolve_in(cache: &Cache, id: &str, revision: &str, offline: bool) -> Result<PathBuf> {
    check_repo_id(id)?;
    check_revision(revision)?;
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let folder = cache.path().join(repo.folder_name());
    // The commit a branch or tag points to is read from the cache; it becomes a path.
    let commit = if is_commit(revision) {
        Some(revision.to_string())
    } else {
        let ref_path = folder.join("refs").join(revision);
        match std::fs::read_to_string(&ref_path) {
            Ok(text) => {
                let c = text.trim();
                if !is_commit(c) {
                    return Err(Error::Checkpoint {
                        path: ref_path,
                        msg: format!("holds {c:?}, not a 40-digit commit hash; the cache is damaged"),
                    });
                }
                Some(c.to_string())
            }
            Err(_) => None,
        }
    };
    let cached = |file: &str| -> Option<PathBuf> {
        let p = folder.join("snapshots").join(commit.as_ref()?).join(file);
        p.is_file().then_some(p)
    };
    let mut fetch = Fetcher {
        cache,
        repo: &repo,
        folder: &folder,
        offline,
        api: None,
    };
    let mut dir = None;
    for f in MODEL_FILES {
        let p = match cached(f) {
            Some(p) => p,
            None => fetch.get(id, revision, f)?,
        };
        dir = p.parent().map(Path::to_path_buf);
    }
    let dir = dir.ok_or_else(|| invalid(format!("hub model {id}: no folder resolved")))?;
    // Weights: one file, or an index and the shards it lists.
    if cached("model.safetensors").is_none() && cached(SHARD_INDEX).is_none() {
        match fetch.get(id, revision, "model.safetensors") {
            Ok(_) => {}
            Err(single) => {
                if fetch.get(id, revision, SHARD_INDEX).is_err() {
                    return Err(single);
                }
            }
        }
    }
    if let Some(index) = cached(SHARD_INDEX).or_else(|| Some(dir.join(SHARD_INDEX)).filter(|p| p.is_file())) {
        for shard in shard_files(&index)? {
            if cached(&shard).is_none() && !dir.join(&shard).is_file() {
                fetch.get(id, revision, &shard)?;
            }
        }
    }
    Ok(dir)
}

/// Downloads files the cache lacks, or explains why it will not.
struct Fetcher<'a> {
    cache: &'a Cache,
    repo: &'a Repo,
    folder: &'a Path,
    offline: bool,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl Fetcher<'_> {
    fn get(&mut self, id: &str, revision: &str, file: &str) -> Result<PathBuf> {
        if self.offline {
            return Err(invalid(format!(
                "hub model {id}@{revision}: {file} is not in the cache ({}) and HF_HUB_OFFLINE is set; \
                 download it where the Hub is reachable (e.g. `huggingface-cli download {id}`) and copy the \
                 cache, point HF_HOME at a cache that has it, or use `checkpoint = \"DIR\"` for a local folder",
                self.folder.display()
            )));
        }
        if self.api.is_none() {
            let api = hf_hub::api::sync::ApiBuilder::from_cache(self.cache.clone())
                .with_progress(false)
                .build()
                .map_err(|e| invalid(format!("hub model {id}: cannot start the Hub client: {e}")))?;
            self.api = Some(api.repo(self.repo.clone()));
        }
        let api = self.api.as_ref().ok_or_else(|| invalid("hub client missing".into()))?;
        api.get(file).map_err(|e| {
            invalid(format!(
                "hub model {id}@{revision}: cannot download {file} ({e}); on a machine without access to the Hub, \
                 set HF_HUB_OFFLINE=1 and provide the files in the cache ({}), or use `checkpoint = \"DIR\"`",
                self.folder.display()
            ))
        })
    }
}

/// The distinct shard files a `model.safetensors.index.json` lists, in order, each
/// checked to be a plain file name.
pub fn shard_files(index: &Path) -> Result<Vec<String>> {
    let bad = |msg: String| Error::Checkpoint {
        path: index.to_path_buf(),
        msg,
    };
    let len = std::fs::metadata(index)
        .map_err(|e| bad(format!("cannot read: {e}")))?
        .len();
    if len > 64 << 20 {
        return Err(bad(format!("{len} bytes is too large for a shard index")));
    }
    let text = std::fs::read_to_string(index).map_err(|e| bad(format!("cannot read: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("has no `weight_map` object (tensor name -> shard file)".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
        check_plain_file(file, index)?;
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    if files.is_empty() {
        return Err(bad("lists no shard files".into()));
    }
    Ok(files)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_revisions_that_could_leave_the_cache_are_refused() {
        for ok in ["HuggingFaceTB/SmolLM2-135M-Instruct", "org/m.v1", "a/b_c"] {
            check_repo_id(ok).unwrap();
        }
        for bad in [
            "",
            "noslash",
            "../x",
            "a/..",
            "a/b/c",
            "/abs",
            "a/.hidden",
            "a/b c",
            "a/b\0",
        ] {
            assert!(check_repo_id(bad).is_err(), "{bad:?}");
        }
        for ok in ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"] {
            check_revision(ok).unwrap();
        }
        for bad in ["", "../main", "a/../../b", "/etc", "a//b", "x y"] {
            assert!(check_revision(bad).is_err(), "{bad:?}");
        }
    }

    /// A cache folder as the Hub client leaves it: refs/main -> commit, snapshot files.
    fn fake_cache(root: &Path, id: &str, commit: &str, files: &[(&str, &str)]) {
        let folder = root.join(format!("models--{}", id.replace('/', "--")));
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), commit).unwrap();
        let snap = folder.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for (name, body) in files {
            std::fs::write(snap.join(name), body).unwrap();
        }
    }

    #[test]
    fn resolves_from_the_cache_offline_and_explains_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
        fake_cache(
            tmp.path(),
            "org/tiny",
            commit,
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                (SHARD_INDEX, index),
                ("model-00001-of-00002.safetensors", "x"),
                ("model-00002-of-00002.safetensors", "x"),
            ],
        );
        let cache = Cache::new(tmp.path().to_path_buf());
        let dir = resolve_in(&cache, "org/tiny", "main", true).unwrap();
        assert!(dir.ends_with(format!("snapshots/{commit}")));
        assert_eq!(resolve_in(&cache, "org/tiny", commit, true).unwrap(), dir);

        // A missing shard, offline: the error names it, the cache and the ways out.
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        let e = resolve_in(&cache, "org/tiny", "main", true).unwrap_err().to_string();
        assert!(
            e.contains("model-00002-of-00002.safetensors") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        let e = resolve_in(&cache, "org/other", "main", true).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("models--org--other"), "{e}");

        // A shard index that points outside the folder, or a ref that is not a commit.
        std::fs::write(
            dir.join(SHARD_INDEX),
            r#"{"weight_map": {"a": "../../../../etc/passwd"}}"#,
        )
        .unwrap();
        let e = resolve_in(&cache, "org/tiny", "main", true).unwrap_err().to_string();
        assert!(e.contains("not a plain file name"), "{e}");
        std::fs::write(tmp.path().join("models--org--tiny/refs/main"), "../../x").unwrap();
        let e = resolve_in(&cache, "org/tiny", "main", true).unwrap_err().to_string();
        assert!(e.contains("not a 40-digit commit hash"), "{e}");
    }
}
