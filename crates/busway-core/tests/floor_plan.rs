//! busway-core has a floor plan without circles: no module imports a module that imports it
//! back. Run with `--nocapture` to print the plan (modules, lines, imports).

#[path = "support/floor_plan.rs"]
mod floor_plan;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    floor_plan::assert_no_cycles("busway-core", env!("CARGO_MANIFEST_DIR"), 20);
}

/// The checker finds a circle when there is one, through `use` trees, `super::` paths and
/// child-module re-exports, and ignores paths in comments, strings and unit tests.
#[test]
fn the_checker_finds_a_circle() {
    let dir = std::env::temp_dir().join(format!("busway-floor-plan-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("b")).expect("create a scratch crate");
    let files = [
        ("lib.rs", "mod a;\nmod b;\nmod c;\n"),
        (
            "a.rs",
            "use crate::{b::Thing, c};\n// crate::c::Other in a comment\nconst S: &str = \"crate::c\";\n",
        ),
        ("b/mod.rs", "mod inner;\npub use inner::Thing;\n"),
        (
            "b/inner.rs",
            "pub struct Thing;\nfn f() { super::super::a::g(); }\n",
        ),
        (
            "c.rs",
            "#[cfg(test)]\nmod tests {\n    use crate::a::*;\n}\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(src.join(name), text).expect("write a scratch file");
    }
    let modules = floor_plan::modules(&src);
    let cycles = floor_plan::cycles(&modules);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        cycles,
        vec![vec![
            "a".to_string(),
            "b".to_string(),
            "b::inner".to_string()
        ]],
        "{}",
        floor_plan::table(&modules)
    );
    let c = modules.iter().find(|m| m.name == "c").expect("module c");
    assert!(
        c.imports.is_empty(),
        "unit tests are not imports: {:?}",
        c.imports
    );
}
