//! `scripts/check-layers` passes on the tree as it is, and fails, naming the files, when a
//! circle, a family named outside the registry, or an I/O import in a pure module is added.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A copy of the library's and the worker's sources in a fresh folder.
fn copy_of_sources(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("fr-layers-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["src", "worker/src"] {
        copy_dir(&repo().join(dir), &root.join(dir));
    }
    root
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs the check on `root`; its exit status and what it said.
fn check(root: &Path) -> (bool, String) {
    let out = Command::new("python3")
        .arg(repo().join("scripts/check-layers"))
        .arg(root)
        .output()
        .expect("python3 runs scripts/check-layers");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

fn append(root: &Path, file: &str, line: &str) {
    let path = root.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n{line}\n")).unwrap();
}

#[test]
fn the_tree_keeps_its_layers() {
    let (ok, said) = check(&repo());
    assert!(ok, "{said}");
}

#[test]
fn a_circle_added_on_purpose_is_named() {
    let root = copy_of_sources("circle");
    // config.rs uses the store's settings; the store using the config closes a circle.
    append(&root, "src/store/settings.rs", "use crate::config::Config;");
    let (ok, said) = check(&root);
    assert!(!ok, "{said}");
    assert!(said.contains("import circle"), "{said}");
    assert!(said.contains("src/store/settings.rs"), "{said}");
    assert!(said.contains("src/config.rs"), "{said}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_family_named_outside_the_registry_is_named() {
    let root = copy_of_sources("family");
    append(
        &root,
        "src/model/loading/mod.rs",
        "use crate::model::families::clip::ClipModel;",
    );
    let (ok, said) = check(&root);
    assert!(!ok, "{said}");
    assert!(
        said.contains("src/model/loading/mod.rs") && said.contains("family clip"),
        "{said}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_pure_module_using_redis_is_named() {
    let root = copy_of_sources("pure");
    append(
        &root,
        "src/gate.rs",
        "pub fn connect(url: &str) { let _ = redis::Client::open(url); }",
    );
    let (ok, said) = check(&root);
    assert!(!ok, "{said}");
    assert!(
        said.contains("src/gate.rs") && said.contains("I/O crate redis"),
        "{said}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
