//! What the fuzz targets share: a scratch folder per process, and the files a target's checkpoint
//! needs beside the bytes under test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository's checkpoint fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A folder of this process's own under the temporary one (`scripts/fuzz.sh` gives each run its
/// own and removes it; libFuzzer ends the process with `exit`, so nothing here does).
pub fn scratch() -> &'static Path {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("switchyard-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

/// A checkpoint folder under [`scratch`] named `name`, holding links to every file of the fixture
/// `fixture` except `replaced` (which the target writes with the bytes under test). Call it once
/// per process and keep the path.
pub fn checkpoint_beside(name: &str, fixture: &str, replaced: &str) -> PathBuf {
    let dir = scratch().join(name);
    std::fs::create_dir_all(&dir).expect("a checkpoint folder");
    for entry in std::fs::read_dir(fixtures().join(fixture)).expect("the fixture") {
        let path = entry.expect("an entry").path();
        let file_name = path.file_name().expect("a file name");
        if file_name != replaced {
            std::os::unix::fs::symlink(&path, dir.join(file_name)).expect("link the fixture's files");
        }
    }
    dir
}
