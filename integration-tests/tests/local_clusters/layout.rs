//! The layout's promises, checked against what cargo resolves for each package on its own (its own
//! features, as a crate that depends on it alone gets them): the client library a serving process
//! embeds links no command-line, plotting, progress-bar, `anyhow` or libtorch crate, and the
//! coordinator links no libtorch.

use std::collections::BTreeSet;
use std::process::Command;

/// The packages `package` needs at run time: normal dependencies, transitively; proc macros are left
/// out (they run in the compiler, not in the library).
fn runtime_dependencies(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "--offline", "-p", package, "-e", "normal,no-proc-macro", "--prefix", "none"])
        .args(["--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != package)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_client_library_links_no_tool_crates_and_no_libtorch() {
    let dependencies = runtime_dependencies("switchyard-router-client");
    assert!(dependencies.contains("tonic"), "the tree was read: {dependencies:?}");
    for forbidden in ["clap", "plotters", "indicatif", "anyhow", "tch", "torch-sys", "switchyard-experts"] {
        assert!(!dependencies.contains(forbidden), "switchyard-router-client links {forbidden}");
    }
}

#[test]
fn the_coordinator_links_no_libtorch() {
    let dependencies = runtime_dependencies("switchyard-coordinator");
    assert!(dependencies.contains("switchyard-model"), "the tree was read: {dependencies:?}");
    assert!(!dependencies.contains("torch-sys") && !dependencies.contains("tch"));
}

/// `switchyard` answers `--version`, `status` and the other client commands without loading
/// libtorch (its package links none); the commands that compute with it are handed to
/// `switchyard-torch`.
#[test]
fn the_switchyard_command_links_no_libtorch_and_hands_libtorch_work_on() {
    let dependencies = runtime_dependencies("switchyard-loadtest");
    assert!(dependencies.contains("switchyard-router-client"), "the tree was read: {dependencies:?}");
    for forbidden in ["tch", "torch-sys", "switchyard-experts", "switchyard-reference", "switchyard-tools"] {
        assert!(!dependencies.contains(forbidden), "switchyard-loadtest links {forbidden}");
    }
    let binaries = switchyard_integration_tests::binaries_dir();
    // No library path to find libtorch by: a binary that needed it would not start.
    let run = |binary: &str, args: &[&str]| {
        Command::new(binaries.join(binary))
            .args(args)
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("LD_PRELOAD")
            .output()
            .expect("the binary runs")
    };
    let version = run("switchyard", &["--version"]);
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("switchyard {}", env!("CARGO_PKG_VERSION")));
    // A libtorch command reaches switchyard-torch, whose own flags answer (a bad one is named).
    let bench = run("switchyard", &["bench", "--no-such-flag"]);
    assert!(!bench.status.success());
    let said = String::from_utf8_lossy(&bench.stderr);
    assert!(said.contains("--no-such-flag"), "{said}");
    for asked in [&["device-check", "--help"][..], &["help", "device-check"][..]] {
        let help = run("switchyard", asked);
        assert!(String::from_utf8_lossy(&help.stdout).contains("--fixtures"), "switchyard-torch's help for {asked:?}");
    }
}
