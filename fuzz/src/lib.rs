//! What the fuzz targets share: a scratch folder per process, and the files a target's checkpoint
//! needs beside the bytes under test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository's checkpoint fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A folder of this process's own, removed by nobody: libFuzzer ends the process with `exit`, and
/// the operating system's temporary folder is where it lives.
pub fn scratch() -> &'static Path {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("switchyard-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

/// A checkpoint folder under [`scratch`] named `name`, holding links to every file of the fixture
/// `fixture` except `replaced` (which the target writes with the bytes under test).
pub fn checkpoint_beside(name: &str, fixture: &str, replaced: &str) -> &'static Path {
    static DIRS: OnceLock<std::sync::Mutex<Vec<(String, &'static Path)>>> = OnceLock::new();
    let mut dirs = DIRS.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, dir)) = dirs.iter().find(|(known, _)| known == name) {
        return dir;
    }
    let dir: &'static Path = Box::leak(scratch().join(name).into_boxed_path());
    std::fs::create_dir_all(dir).expect("a checkpoint folder");
    for entry in std::fs::read_dir(fixtures().join(fixture)).expect("the fixture") {
        let path = entry.expect("an entry").path();
        let file_name = path.file_name().expect("a file name");
        let link = dir.join(file_name);
        if file_name != replaced && !link.exists() {
            std::os::unix::fs::symlink(&path, &link).expect("link the fixture's files");
        }
    }
    dirs.push((name.to_owned(), dir));
    dir
}
