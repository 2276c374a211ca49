//! Checks on the shape of the source tree that review would otherwise have to repeat: the
//! top-level modules of proxy-userspace import each other without a cycle, and no source
//! file grows past one concept's worth of lines.

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        fs,
        path::{Path, PathBuf},
    };

    /// A file longer than this holds more than one concept (CONTRIBUTING.md).
    const MOST_LINES: usize = 600;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("source folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The first path segment of every `crate::` path in `source`, test modules left out:
    /// `use crate::{a::X, b}` and `crate::c::f()` give a, b and c.
    fn crate_imports(source: &str) -> BTreeSet<String> {
        let source = source
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        let mut found = BTreeSet::new();
        let mut rest = source;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level names of the group: after `{` or a comma at depth zero.
                let mut depth = 0;
                let mut expecting = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            rest = &group[i..];
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => expecting = true,
                        c if expecting && (c.is_ascii_lowercase() || c == '_') => {
                            let name: String = group[i..]
                                .chars()
                                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                                .collect();
                            found.insert(name);
                            expecting = false;
                        }
                        c if !c.is_whitespace() => expecting = false,
                        _ => {}
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
        found
    }

    #[test]
    fn userspace_modules_import_each_other_without_a_cycle() {
        let src = root().join("proxy-userspace/src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let relative = file.strip_prefix(&src).expect("under src");
            let top = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("a name")
                .trim_end_matches(".rs")
                .to_owned();
            if top == "lib" || top == "main" {
                continue;
            }
            let imports = crate_imports(&fs::read_to_string(&file).expect("source"));
            let edges = graph.entry(top.clone()).or_default();
            edges.extend(imports.into_iter().filter(|name| *name != top));
        }
        assert!(graph.len() > 5, "found only {:?}", graph.keys());
        // Depth-first search; a module met again while on the path closes a cycle.
        fn visit(
            module: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if let Some(at) = path.iter().position(|m| m == module) {
                panic!("import cycle: {} -> {module}", path[at..].join(" -> "));
            }
            if !done.insert(module.to_owned()) {
                return;
            }
            path.push(module.to_owned());
            for next in graph.get(module).into_iter().flatten() {
                visit(next, graph, path, done);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for module in graph.keys() {
            visit(module, &graph, &mut Vec::new(), &mut done);
        }
    }

    #[test]
    fn the_import_reader_sees_groups_and_paths() {
        let found = crate_imports(
            "use crate::{\n    a::X,\n    bb::{self, Y},\n};\nfn f() { crate::c_d::g(); }\n",
        );
        assert_eq!(found, BTreeSet::from(["a", "bb", "c_d"].map(String::from)));
    }

    #[test]
    fn no_source_file_holds_more_than_one_concept() {
        let mut files = Vec::new();
        for crate_dir in ["proxy-userspace", "proxy-ebpf", "proxy-common", "xtask"] {
            rust_files(&root().join(crate_dir).join("src"), &mut files);
        }
        let long: Vec<String> = files
            .iter()
            .filter_map(|file| {
                let lines = fs::read_to_string(file).ok()?.lines().count();
                (lines > MOST_LINES).then(|| format!("{} ({lines})", file.display()))
            })
            .collect();
        assert!(long.is_empty(), "over {MOST_LINES} lines: {long:?}");
    }
}
