//! Sandcastle's test kit: what the tests, the benchmarks and local development share —
//! a real local control plane, the scripted Anthropic-compatible model, the harness that
//! runs a suite on one shared cluster, the operator as a child process, and the sandbox
//! server's benchmark figures. Never linked into the operator binary.

pub mod agent_sandbox;
pub mod base;
pub mod bursts;
pub mod cases;
pub mod cluster;
pub mod figures;
pub mod git_server;
pub mod localcluster;
pub mod model;
pub mod node;
pub mod operator;
pub mod scenarios;
pub mod sightings;

use std::path::{Path, PathBuf};

/// The repository's root: the examples, CRDs, chart and docs the tests read.
pub fn repo() -> &'static Path {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        root.canonicalize().unwrap_or(root)
    })
}

/// Where tests keep their scratch files: cargo's `target/tmp`, the directory integration
/// tests know as `CARGO_TARGET_TMPDIR`.
pub fn scratch_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("tmp")
}

/// The `sandcastle` binary cargo built beside the running test or benchmark (cargo builds
/// a package's binaries before its integration tests and benchmarks), or
/// `$SANDCASTLE_OPERATOR_BIN`.
/// The static envd of sandbox pods, as `tools/images/build-envd.sh` builds it (which
/// `scripts/test` runs before the tests).
pub fn envd_binary() -> Result<PathBuf, String> {
    let host = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    // The target directory is the one this test executable was built into
    // (`<target>/<profile>/deps/<test>`), wherever CARGO_TARGET_DIR put it.
    let exe = std::env::current_exe().map_err(|err| format!("the test's own path: {err}"))?;
    let target = exe
        .ancestors()
        .nth(3)
        .ok_or_else(|| format!("{} is not under <target>/<profile>/deps", exe.display()))?;
    let path = target.join(host).join("debug/sandcastle-envd");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it with tools/images/build-envd.sh",
            path.display()
        ))
    }
}

pub fn operator_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SANDCASTLE_OPERATOR_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the running executable's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("a test executable under target/<profile>/deps")
        .join("sandcastle")
}

/// The Claude Code CLI for the sandbox image: only its native executable (the CLI needs
/// no Node), hard-linked so the image's cached layer stays valid between runs.
pub fn claude_native() -> std::path::PathBuf {
    let installed = repo().join(".tools/bin/claude");
    let executable = installed
        .canonicalize()
        .unwrap_or_else(|err| panic!("{}: {err}: run scripts/setup", installed.display()));
    let dir = scratch_dir().join("claude-native");
    let target = dir.join("bin/claude");
    let same = |a: &std::path::Path, b: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    };
    if !same(&executable, &target) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).expect("a directory");
        std::fs::hard_link(&executable, &target)
            .or_else(|_| std::fs::copy(&executable, &target).map(drop))
            .expect("the CLI in place");
    }
    dir
}
