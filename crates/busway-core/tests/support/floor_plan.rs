//! The floor plan of a crate: which of its modules (files) import which, and whether any of
//! them import one that imports them back. Shared by the floor-plan tests of busway-core and
//! busway-outbox; reads the source, so it needs no build tool.
//!
//! An edge is every `crate::`, `self::` or `super::` path outside comments and strings, and
//! every `use` of a child module; it points at the deepest module (file) the path names.
//! `mod` declarations are ownership, not imports, and the crate root (`lib.rs`, the facade of
//! re-exports) is not a source of edges, so paths that name an item through the root are
//! refused instead: they would hide an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One module (file) of the crate.
#[derive(Debug)]
pub(crate) struct Module {
    /// `crate`-relative path: `endpoint::receive`; `` for the root.
    pub(crate) name: String,
    /// Lines in the file.
    pub(crate) lines: usize,
    /// Import count per imported module.
    pub(crate) imports: BTreeMap<String, usize>,
}

/// The modules of the crate whose `src` is `src`.
pub(crate) fn modules(src: &Path) -> Vec<Module> {
    let mut files = Vec::new();
    collect(src, &mut files);
    let names: BTreeSet<String> = files.iter().map(|f| module_name(src, f)).collect();
    let mut out = Vec::new();
    for file in &files {
        let name = module_name(src, file);
        let text = std::fs::read_to_string(file).expect("read a source file");
        let code = without_test_modules(&strip(&text));
        let mut imports = BTreeMap::new();
        if !name.is_empty() {
            for path in paths(&code, &name, &names) {
                let target = resolve(&path, &names);
                if target == name {
                    continue;
                }
                assert!(
                    !target.is_empty(),
                    "{}: `{}` names an item through the crate root; use the module that \
                     defines it",
                    file.display(),
                    path.join("::")
                );
                *imports.entry(target).or_insert(0) += 1;
            }
        }
        out.push(Module {
            name,
            lines: text.lines().count(),
            imports,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The groups of modules that import each other (strongly connected, more than one).
pub(crate) fn cycles(modules: &[Module]) -> Vec<Vec<String>> {
    let index: BTreeMap<&str, usize> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    let edges: Vec<Vec<usize>> = modules
        .iter()
        .map(|m| {
            m.imports
                .keys()
                .filter_map(|k| index.get(k.as_str()).copied())
                .collect()
        })
        .collect();
    // Tarjan's algorithm, iterative.
    let n = modules.len();
    let (mut order, mut low) = (vec![usize::MAX; n], vec![0; n]);
    let (mut stack, mut on_stack, mut next, mut found) =
        (Vec::new(), vec![false; n], 0, Vec::new());
    for root in 0..n {
        if order[root] != usize::MAX {
            continue;
        }
        let mut work = vec![(root, 0usize)];
        while let Some(&mut (v, ref mut child)) = work.last_mut() {
            if *child == 0 && order[v] == usize::MAX {
                order[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            if let Some(&w) = edges[v].get(*child) {
                *child += 1;
                if order[w] == usize::MAX {
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(order[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == order[v] {
                let mut group = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    group.push(modules[w].name.clone());
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    found.push(group);
                }
            }
        }
    }
    found
}

/// The floor plan as a table: module, lines, imports, imported modules.
pub(crate) fn table(modules: &[Module]) -> String {
    let mut out = String::from("module | lines | imports | imports from\n");
    for m in modules {
        let name = if m.name.is_empty() { "(lib)" } else { &m.name };
        let total: usize = m.imports.values().sum();
        let from: Vec<&str> = m.imports.keys().map(String::as_str).collect();
        out.push_str(&format!(
            "{name} | {} | {total} | {}\n",
            m.lines,
            from.join(", ")
        ));
    }
    out
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_name(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("a file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The source with comments removed and string and char literals emptied.
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&chars, i) {
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            'raw: while j < chars.len() {
                if chars[j] == '"' && (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break 'raw;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{..}'), or a lifetime ('a).
            if next == Some('\\') {
                let mut j = i + 2;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str("' '");
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The code without its inline `#[cfg(test)] mod .. { .. }` blocks: unit tests are not part
/// of the floor plan (and their `super::` means the file's own module).
fn without_test_modules(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_mod = trimmed.starts_with("mod ") || trimmed.starts_with("pub(crate) mod ");
        let open = trimmed.find(['{', ';']);
        match (is_mod, open) {
            (true, Some(o)) if trimmed.as_bytes()[o] == b'{' => {
                let body = &trimmed[o..];
                let mut depth = 0usize;
                let mut end = body.len();
                for (i, c) in body.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &body[end..];
            }
            _ => {
                out.push_str("#[cfg(test)]");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// Every module path the code names, as segments from the crate root.
fn paths(code: &str, module: &str, names: &BTreeSet<String>) -> Vec<Vec<String>> {
    let file: Vec<String> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").map(str::to_string).collect()
    };
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    // Inline `mod name { .. }` blocks: their names and the brace depth they opened at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut pending_mod: Option<String> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            depth += 1;
            if let Some(name) = pending_mod.take() {
                inline.push((name, depth));
            }
            i += 1;
            continue;
        }
        if c == '}' {
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
            i += 1;
            continue;
        }
        if c == ';' {
            pending_mod = None;
        }
        if ident_before(&chars, i) || !(c.is_alphabetic() || c == '_') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if word == "mod" {
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let name_start = j;
            while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            pending_mod = Some(chars[name_start..j].iter().collect());
            i = j;
            continue;
        }
        if !(chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':')) {
            continue;
        }
        // Where this code is: the file's module, then the inline modules around it.
        let mut here = file.clone();
        here.extend(inline.iter().map(|(n, _)| n.clone()));
        let base: Vec<String> = match word.as_str() {
            "crate" => Vec::new(),
            "self" => here.clone(),
            "super" => here[..here.len().saturating_sub(1)].to_vec(),
            child => {
                let mut p = here.clone();
                p.push(child.to_string());
                if !names.contains(&p.join("::")) {
                    continue;
                }
                // A path that starts at a child module: keep the child as the first segment.
                let mut j = start;
                use_tree(&chars, &mut j, here, &mut out);
                i = j;
                continue;
            }
        };
        let mut j = i + 2;
        use_tree(&chars, &mut j, base, &mut out);
        i = j;
    }
    out
}

/// Reads a path or a `{..}` tree at `i`, pushing every full path.
fn use_tree(chars: &[char], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    let mut path = prefix;
    loop {
        skip_ws(i);
        if chars.get(*i) == Some(&'{') {
            *i += 1;
            loop {
                skip_ws(i);
                match chars.get(*i) {
                    Some('}') => {
                        *i += 1;
                        return;
                    }
                    Some(',') => *i += 1,
                    None => return,
                    _ => use_tree(chars, i, path.clone(), out),
                }
            }
        }
        let start = *i;
        while *i < chars.len()
            && (chars[*i].is_alphanumeric() || chars[*i] == '_' || chars[*i] == '*')
        {
            *i += 1;
        }
        if *i == start {
            out.push(path);
            return;
        }
        let segment: String = chars[start..*i].iter().collect();
        match segment.as_str() {
            "super" => {
                path.pop();
            }
            "self" => {}
            _ => path.push(segment),
        }
        if chars.get(*i) == Some(&':') && chars.get(*i + 1) == Some(&':') {
            *i += 2;
            continue;
        }
        // `as name`, or the end of the path.
        out.push(path);
        skip_ws(i);
        if chars[*i..].starts_with(&['a', 's', ' ']) {
            *i += 2;
            skip_ws(i);
            while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
                *i += 1;
            }
        }
        return;
    }
}

/// The deepest module a path names (`` for the crate root).
fn resolve(path: &[String], names: &BTreeSet<String>) -> String {
    let mut best = String::new();
    for n in 1..=path.len() {
        let candidate = path[..n].join("::");
        if names.contains(&candidate) {
            best = candidate;
        }
    }
    best
}

/// Prints the floor plan of the crate at `manifest_dir` and fails if it has a circle (or if
/// fewer than `at_least` modules were found: the walk went wrong).
pub(crate) fn assert_no_cycles(crate_name: &str, manifest_dir: &str, at_least: usize) {
    let src = Path::new(manifest_dir).join("src");
    let modules = modules(&src);
    println!("{}", table(&modules));
    assert!(
        modules.len() >= at_least,
        "the floor plan of {crate_name} found only {} modules under {}",
        modules.len(),
        src.display()
    );
    let cycles = cycles(&modules);
    assert!(
        cycles.is_empty(),
        "modules of {crate_name} import each other: {cycles:?}\n{}",
        table(&modules)
    );
}
