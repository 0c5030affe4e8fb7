//! The library's layout holds: no import cycle between its top-level modules, the
//! leaves (`config`, `error`, `fsio`, `kernels`, `progress`) import nothing else of the
//! crate, no file has more than 800 lines outside its tests, and no function is longer
//! than 150 lines. Read from the source, so a change that breaks a rule fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 150;
const LEAVES: [&str; 5] = ["config", "error", "fsio", "kernels", "progress"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable").flatten() {
        let p = entry.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The lines of a file outside its `#[cfg(test)] mod ... { }` blocks.
fn non_test_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < lines.len() {
        let mut k = i + 1;
        while k < lines.len() && lines[k].trim_start().starts_with("#[") {
            k += 1;
        }
        let is_mod = |l: &str| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            l.starts_with("mod ") && l.trim_end().ends_with('{')
        };
        if lines[i].trim() == "#[cfg(test)]" && k < lines.len() && is_mod(lines[k]) {
            let mut depth = 0i64;
            i = k;
            while i < lines.len() {
                depth += braces(lines[i]);
                i += 1;
                if depth <= 0 {
                    break;
                }
            }
            continue;
        }
        out.push(lines[i]);
        i += 1;
    }
    out
}

/// Opening minus closing braces of a line, comments and string literals aside.
fn braces(line: &str) -> i64 {
    let code = line.split("//").next().unwrap_or("");
    let (mut n, mut in_str, mut prev) = (0, false, ' ');
    for c in code.chars() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '{' if !in_str => n += 1,
            '}' if !in_str => n -= 1,
            _ => {}
        }
        prev = c;
    }
    n
}

/// The top-level module a file belongs to: `src/loss/full.rs` -> `loss`.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src/");
    let first = rel
        .components()
        .next()
        .expect("a component")
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// `crate::X` paths in code (not in comments) name the modules a file imports.
fn imports(lines: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in lines {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_lowercase()) {
                out.insert(name);
            }
        }
    }
    out
}

/// (name, lines) of every function whose body opens on its signature's last line.
fn functions(lines: &[&str]) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(pos) = t.find("fn ") else { continue };
        let head = &t[..pos];
        let is_fn = head
            .split_whitespace()
            .all(|w| matches!(w, "pub" | "const" | "unsafe" | "async" | "extern" | "\"C\"") || w.starts_with("pub("));
        if !is_fn || t.starts_with("//") {
            continue;
        }
        let name: String = t[pos + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut started) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            if !started && l.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            depth += braces(l);
            started |= l.contains('{');
            if started && depth <= 0 {
                out.push((name.clone(), j - i + 1));
                break;
            }
        }
    }
    out
}

fn cycle_from(node: &str, edges: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|n| n == node) {
        return Some(path[i..].to_vec());
    }
    path.push(node.to_string());
    for next in edges.get(node).into_iter().flatten() {
        if let Some(c) = cycle_from(next, edges, path) {
            return Some(c);
        }
    }
    path.pop();
    None
}

#[test]
fn the_library_layout_holds() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} source files under {}",
        files.len(),
        src.display()
    );
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a readable source file");
        let lines = non_test_lines(&text);
        let module = top_module(&src, file);
        let rel = file.strip_prefix(&src).unwrap_or(file).display().to_string();
        if lines.len() > MAX_FILE_LINES {
            problems.push(format!(
                "{rel}: {} lines outside its tests (at most {MAX_FILE_LINES})",
                lines.len()
            ));
        }
        for (name, n) in functions(&lines) {
            if n > MAX_FN_LINES {
                problems.push(format!("{rel}: fn {name} has {n} lines (at most {MAX_FN_LINES})"));
            }
        }
        let used: BTreeSet<String> = imports(&lines)
            .into_iter()
            .filter(|m| *m != module && m != "test_util")
            .collect();
        if LEAVES.contains(&module.as_str()) {
            for m in used.iter().filter(|m| *m != "error") {
                problems.push(format!("{rel}: the leaf `{module}` imports `crate::{m}`"));
            }
        }
        edges.entry(module).or_default().extend(used);
    }
    for start in edges.keys() {
        if let Some(cycle) = cycle_from(start, &edges, &mut Vec::new()) {
            problems.push(format!(
                "import cycle between top-level modules: {}",
                cycle.join(" -> ")
            ));
            break;
        }
    }
    assert!(problems.is_empty(), "the layout is broken:\n{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_a_cycle_and_a_long_function() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("a".into());
    assert!(cycle_from("a", &edges, &mut Vec::new()).is_some());
    let body = format!("pub fn long() {{\n{}}}\n", "    x();\n".repeat(200));
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(functions(&lines), vec![("long".to_string(), 202)]);
    let with_tests = "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn b() {}\n}\n";
    assert_eq!(non_test_lines(with_tests), vec!["fn a() {}"]);
}
