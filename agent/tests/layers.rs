//! The house rule on the agent's folders, read off the source: no circle runs
//! between the top-level modules, and the core (the agent and the subsystems
//! it drives, plus what they share) never imports the HTTP face, the
//! operator's tools or the launcher. ARCHITECTURE.md draws the same layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules that must never import a face or a tool.
const CORE: [&str; 10] = [
    "agent", "cluster", "names", "state", "tunnel", "config", "events", "model", "notices",
    "report",
];
/// The faces and tools around the core.
const OUTER: [&str; 3] = ["api", "ops", "launch"];

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read agent/src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            found.extend(sources(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
    found
}

/// The top-level module a file belongs to: its folder, or its own stem.
fn unit_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.strip_suffix(".rs").unwrap_or(&name).to_owned()
}

/// The top-level modules a file names through `crate::`, including every
/// item of a grouped `use crate::{a, b::c}`.
fn referenced_units(text: &str) -> BTreeSet<String> {
    let mut units = BTreeSet::new();
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: the first identifier after the
            // opening brace and after each comma at depth one.
            let mut depth = 1;
            let mut expecting = true;
            let mut ident = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expecting = true,
                    c if expecting && (c.is_alphanumeric() || c == '_') => ident.push(c),
                    _ => {
                        if !ident.is_empty() {
                            units.insert(std::mem::take(&mut ident));
                            expecting = false;
                        }
                    }
                }
            }
            if !ident.is_empty() {
                units.insert(ident);
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                units.insert(ident);
            }
        }
    }
    units
}

/// Which top-level module imports which, with one file as the witness of each arrow.
fn import_graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in sources(&src) {
        let from = unit_of(&src, &file);
        if from == "lib" || from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        for to in referenced_units(&text) {
            let is_module = src.join(&to).is_dir() || src.join(format!("{to}.rs")).is_file();
            if to != from && is_module {
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| file.clone());
            }
        }
    }
    graph
}

#[test]
fn the_core_never_imports_a_face_or_a_tool() {
    let graph = import_graph();
    let mut breaches = Vec::new();
    for core in CORE {
        for (to, witness) in graph.get(core).into_iter().flatten() {
            if OUTER.contains(&to.as_str()) {
                breaches.push(format!("{core} -> {to} (in {})", witness.display()));
            }
        }
    }
    assert!(
        breaches.is_empty(),
        "the core imports the outer layer: {breaches:#?}"
    );
}

#[test]
fn no_circle_runs_between_top_level_modules() {
    let graph = import_graph();
    // Depth-first search from every module; a path back to a module on the
    // current path is a circle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, PathBuf>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|seen| seen == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flat_map(BTreeMap::keys) {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let circle = visit(node, &graph, &mut Vec::new(), &mut done);
        assert!(
            circle.is_none(),
            "modules import each other in a circle: {}",
            circle.unwrap_or_default().join(" -> ")
        );
    }
}

#[test]
fn the_reader_sees_grouped_imports_and_plain_paths() {
    let units = referenced_units(
        "use crate::{agent::Agent, model::{A, B}, events};\nlet x = crate::tunnel::bind(); // crate::api::x\n",
    );
    let expected: BTreeSet<String> = ["agent", "events", "model", "tunnel"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(units, expected);
}
