//! Reading single tensors out of safetensors files, without loading the files.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
//! name to its dtype, shape and byte range, then the data. [`TensorFiles`] reads each file's header
//! once and then seeks to exactly the bytes of the tensors asked for, so a worker holding 4 of 64
//! experts reads 4/64 of the weights. Sharded checkpoints are found through
//! `model.safetensors.index.json` (`weight_map`: tensor name → file). Headers are checked by the
//! `safetensors` crate's own rules (each tensor's bytes follow the previous one's, and hold its shape
//! in its dtype). Every error names the tensor and the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use safetensors::SafeTensorError;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde::Deserialize;

use crate::dtype::{HostTensor, WeightDtype};

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file}: malformed safetensors header: {reason}")]
    Header { file: PathBuf, reason: String },
    #[error("tensor {tensor} not found (looked in {looked_in})")]
    Missing { tensor: String, looked_in: String },
    #[error("tensor {tensor} in {file} has shape {found:?}, expected {expected:?}")]
    Shape { tensor: String, file: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor {tensor} in {file} has dtype {dtype}; supported here: {supported}")]
    Dtype { tensor: String, file: PathBuf, dtype: String, supported: String },
    #[error("tensor {tensor} in {file} needs bytes up to {needed} but the file has {size} (truncated?)")]
    Truncated { tensor: String, file: PathBuf, needed: u64, size: u64 },
}

#[derive(Debug)]
struct Header {
    tensors: Metadata,
    data_start: u64,
    file_size: u64,
}

#[derive(Debug, Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// The tensors of a checkpoint directory: one `model.safetensors`, or shards listed by
/// `model.safetensors.index.json`.
#[derive(Debug)]
pub struct TensorFiles {
    dir: PathBuf,
    /// The file of a checkpoint without an index.
    single_file: PathBuf,
    /// Tensor name → file, from the index (empty for a single-file checkpoint).
    weight_map: HashMap<String, PathBuf>,
    headers: Mutex<HashMap<PathBuf, Arc<Header>>>,
}

/// `file` if it names a file in the checkpoint's own directory: one plain component, no `..`, no
/// absolute path (an index may otherwise point the reader at any file on the machine).
fn shard_name(file: &str) -> Option<&str> {
    let mut components = Path::new(file).components();
    match (components.next(), components.next()) {
        (Some(std::path::Component::Normal(_)), None) => Some(file),
        _ => None,
    }
}

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Refuse absurd header lengths before allocating them.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

impl TensorFiles {
    pub fn open(dir: &Path) -> Result<Self, TensorFileError> {
        let index_path = dir.join(INDEX_FILE);
        let weight_map = if index_path.exists() {
            let io = |source| TensorFileError::Io { file: index_path.clone(), source };
            let mut text = String::new();
            open_regular(&index_path).and_then(|mut file| file.read_to_string(&mut text)).map_err(io)?;
            let malformed = |reason: String| TensorFileError::Header { file: index_path.clone(), reason };
            let index: Index = serde_json::from_str(&text).map_err(|error| malformed(json_error(&error)))?;
            index
                .weight_map
                .into_iter()
                .map(|(tensor, file)| match shard_name(&file) {
                    Some(name) => Ok((tensor, dir.join(name))),
                    None => Err(malformed(format!("{tensor}: shard {file:?} is not a file name in this directory"))),
                })
                .collect::<Result<_, _>>()?
        } else {
            HashMap::new()
        };
        let single_file = dir.join(SINGLE_FILE);
        Ok(Self { dir: dir.to_path_buf(), single_file, weight_map, headers: Mutex::new(HashMap::new()) })
    }

    /// One safetensors file on its own (no index).
    pub fn open_file(file: &Path) -> Self {
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Self { dir, single_file: file.to_path_buf(), weight_map: HashMap::new(), headers: Mutex::new(HashMap::new()) }
    }

    fn file_of(&self, tensor: &str) -> Result<PathBuf, TensorFileError> {
        if self.weight_map.is_empty() {
            return Ok(self.single_file.clone());
        }
        self.weight_map.get(tensor).cloned().ok_or_else(|| TensorFileError::Missing {
            tensor: tensor.to_owned(),
            looked_in: self.dir.join(INDEX_FILE).display().to_string(),
        })
    }

    fn header(&self, file: &Path) -> Result<Arc<Header>, TensorFileError> {
        let mut headers = self.headers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(header) = headers.get(file) {
            return Ok(header.clone());
        }
        let header = Arc::new(read_header(file)?);
        headers.insert(file.to_path_buf(), header.clone());
        Ok(header)
    }

    /// The file holding `tensor`, its header, and its entry there.
    fn locate(&self, tensor: &str) -> Result<(PathBuf, Arc<Header>, TensorInfo), TensorFileError> {
        let file = self.file_of(tensor)?;
        let header = self.header(&file)?;
        let entry = header.tensors.info(tensor).cloned().ok_or_else(|| TensorFileError::Missing {
            tensor: tensor.to_owned(),
            looked_in: file.display().to_string(),
        })?;
        Ok((file, header, entry))
    }

    /// Every tensor's name: the index's, or the single file's header's.
    pub fn names(&self) -> Result<Vec<String>, TensorFileError> {
        let mut names: Vec<String> = if self.weight_map.is_empty() {
            self.header(&self.single_file)?.tensors.tensors().into_keys().collect()
        } else {
            self.weight_map.keys().cloned().collect()
        };
        names.sort();
        Ok(names)
    }

    /// The shape of `tensor`, from its file's header.
    pub fn shape(&self, tensor: &str) -> Result<Vec<usize>, TensorFileError> {
        Ok(self.locate(tensor)?.2.shape)
    }

    /// The float dtype `tensor` is stored in, from its file's header.
    pub fn dtype(&self, tensor: &str) -> Result<WeightDtype, TensorFileError> {
        let (file, _, entry) = self.locate(tensor)?;
        WeightDtype::from_safetensors(entry.dtype).ok_or_else(|| TensorFileError::Dtype {
            tensor: tensor.to_owned(),
            file,
            dtype: entry.dtype.to_string(),
            supported: "F32, F16, BF16".to_owned(),
        })
    }

    /// Reads `tensor`, checks it has `expected_shape`, and converts it to f32 (row-major).
    pub fn read_f32(&self, tensor: &str, expected_shape: &[usize]) -> Result<Vec<f32>, TensorFileError> {
        Ok(self.read(tensor, expected_shape)?.to_f32())
    }

    /// Reads `tensor` as it is stored, after checking it has `expected_shape`.
    pub fn read(&self, tensor: &str, expected_shape: &[usize]) -> Result<HostTensor, TensorFileError> {
        let count = expected_shape.iter().product();
        self.read_weights(tensor, expected_shape, 0, count, expected_shape.to_vec())
    }

    /// Reads slab `index` of `tensor` along its first dimension (e.g. one expert of a fused
    /// `[experts, rows, cols]` tensor) as it is stored, after checking the whole tensor has
    /// `expected_shape`: only that slab's bytes are read.
    pub fn read_slab(
        &self,
        tensor: &str,
        expected_shape: &[usize],
        index: usize,
    ) -> Result<HostTensor, TensorFileError> {
        let (&slabs, rest) = expected_shape.split_first().unwrap_or((&1, &[]));
        let slab: usize = rest.iter().product();
        debug_assert!(index < slabs, "slab {index} of {slabs}");
        self.read_weights(tensor, expected_shape, index * slab, slab, rest.to_vec())
    }

    /// Slab `index` of a `U8` tensor along its first dimension, as raw bytes (MXFP4 blocks and scales).
    pub fn read_u8_slab(
        &self,
        tensor: &str,
        expected_shape: &[usize],
        index: usize,
    ) -> Result<Vec<u8>, TensorFileError> {
        let slab: usize = expected_shape.iter().skip(1).product();
        let (_, bytes) = self.read_elements(tensor, expected_shape, index * slab, slab, &[Dtype::U8])?;
        Ok(bytes)
    }

    /// Elements `first..first + count` of a float `tensor`, as a [`HostTensor`] of `shape`.
    fn read_weights(
        &self,
        tensor: &str,
        expected_shape: &[usize],
        first: usize,
        count: usize,
        shape: Vec<usize>,
    ) -> Result<HostTensor, TensorFileError> {
        let (dtype, bytes) =
            self.read_elements(tensor, expected_shape, first, count, &[Dtype::F32, Dtype::F16, Dtype::BF16])?;
        let dtype = WeightDtype::from_safetensors(dtype).expect("one of the float dtypes asked for");
        Ok(HostTensor { dtype, shape, bytes })
    }

    /// The bytes of elements `first..first + count` of `tensor`, whose dtype must be one of
    /// `dtypes`, after checking its shape, its offsets and the file's length.
    fn read_elements(
        &self,
        tensor: &str,
        expected_shape: &[usize],
        first: usize,
        count: usize,
        dtypes: &[Dtype],
    ) -> Result<(Dtype, Vec<u8>), TensorFileError> {
        let (file, header, entry) = self.locate(tensor)?;
        if entry.shape != expected_shape {
            return Err(TensorFileError::Shape {
                tensor: tensor.to_owned(),
                file,
                expected: expected_shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let Some(dtype) = dtypes.iter().copied().find(|dtype| *dtype == entry.dtype) else {
            return Err(TensorFileError::Dtype {
                tensor: tensor.to_owned(),
                file,
                dtype: entry.dtype.to_string(),
                supported: dtypes.iter().map(Dtype::to_string).collect::<Vec<_>>().join(", "),
            });
        };
        // Whole bytes: the header check refused a tensor whose elements do not fill them.
        let element_size = (dtype.bitsize() / 8) as u64;
        let (begin, end) = (entry.data_offsets.0 as u64, entry.data_offsets.1 as u64);
        let needed = header.data_start.checked_add(end);
        if needed.is_none_or(|needed| needed > header.file_size) {
            return Err(TensorFileError::Truncated {
                tensor: tensor.to_owned(),
                file,
                needed: needed.unwrap_or(u64::MAX),
                size: header.file_size,
            });
        }
        let start = header.data_start + begin + first as u64 * element_size;
        let mut bytes = vec![0u8; count * element_size as usize];
        let io = |source| TensorFileError::Io { file: file.clone(), source };
        let mut handle = open_regular(&file).map_err(io)?;
        handle.seek(SeekFrom::Start(start)).map_err(io)?;
        handle.read_exact(&mut bytes).map_err(io)?;
        Ok((dtype, bytes))
    }
}

/// Opens `path` for reading if it is a regular file: a FIFO or a device named as a checkpoint file
/// would block the reader (and with it a worker's load or the coordinator's start) forever.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let metadata = std::fs::metadata(path)?;
    if !metadata.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    File::open(path)
}

/// Where a JSON document went wrong, without its text: serde's messages quote the values they
/// refused, and the file may not be a checkpoint at all (`/etc/passwd` named as one).
pub fn json_error(error: &serde_json::Error) -> String {
    let kind = match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not the expected fields and types",
        serde_json::error::Category::Eof => "cut short",
    };
    if error.line() == 0 {
        return kind.to_owned();
    }
    format!("{kind} (line {}, column {})", error.line(), error.column())
}

/// The safetensors crate's check of a header's tensors (in offset order, each starting where the
/// previous ended and holding its shape in its dtype), its refusal said with the tensor's name:
/// one file's weights read twice under two names would be a malformed, or hostile, checkpoint.
fn checked(mut tensors: Vec<(String, TensorInfo)>) -> Result<Metadata, String> {
    // The crate names no tensor whose bytes do not match its shape: find that one first.
    let holds = |info: &TensorInfo| {
        let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |product, dim| product.checked_mul(*dim));
        bits.filter(|bits| bits % 8 == 0).map(|bits| bits / 8) == info.data_offsets.1.checked_sub(info.data_offsets.0)
    };
    if let Some((name, info)) = tensors.iter().find(|(_, info)| !holds(info)) {
        let ((begin, end), shape, dtype) = (info.data_offsets, &info.shape, info.dtype);
        return Err(format!("{name}: data_offsets {begin}..{end} do not hold {shape:?} {dtype} values"));
    }
    tensors.sort_unstable_by_key(|(_, info)| info.data_offsets);
    Metadata::new(None, tensors).map_err(|error| match error {
        SafeTensorError::InvalidOffset(name) => {
            format!("{name}: data_offsets do not start where the tensor before ends (overlapping or apart)")
        }
        other => other.to_string(),
    })
}

fn read_header(file: &Path) -> Result<Header, TensorFileError> {
    let io = |source| TensorFileError::Io { file: file.to_path_buf(), source };
    let malformed = |reason: String| TensorFileError::Header { file: file.to_path_buf(), reason };
    let mut handle = open_regular(file).map_err(io)?;
    let file_size = handle.metadata().map_err(io)?.len();
    let mut length = [0u8; 8];
    handle.read_exact(&mut length).map_err(|_| malformed("too short for a header".to_owned()))?;
    let length = u64::from_le_bytes(length);
    if length > MAX_HEADER_BYTES || 8 + length > file_size {
        // Neither the bytes read nor the file's size: a file that is not a checkpoint stays unread.
        return Err(malformed("its first 8 bytes are not the length of a header that fits the file".to_owned()));
    }
    let mut json = vec![0u8; length as usize];
    handle.read_exact(&mut json).map_err(io)?;
    let mut entries: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|error| malformed(json_error(&error)))?;
    entries.remove("__metadata__");
    let tensors = entries
        .into_iter()
        .map(|(name, value)| {
            serde_json::from_value::<TensorInfo>(value)
                .map(|entry| (name.clone(), entry))
                .map_err(|error| malformed(format!("{name}: {}", json_error(&error))))
        })
        .collect::<Result<_, _>>()?;
    Ok(Header { tensors: checked(tensors).map_err(malformed)?, data_start: 8 + length, file_size })
}

/// Writes `tensors` (name, shape, f32 values) as one F32 safetensors file: for tests and tools.
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) -> std::io::Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape, values) in tensors {
        let end = offset + 4 * values.len() as u64;
        header.insert(
            (*name).to_owned(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let json = serde_json::Value::Object(header).to_string();
    let mut out = std::io::BufWriter::new(File::create(path)?);
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(json.as_bytes())?;
    for (_, _, values) in tensors {
        for value in *values {
            out.write_all(&value.to_le_bytes())?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_tensor_by_its_offsets_and_checks_its_shape() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<f32> = (0..6).map(|i| i as f32).collect();
        write_f32(&dir.path().join(SINGLE_FILE), &[("a", vec![2, 3], &a), ("b", vec![2], &[7.0, 8.0])]).unwrap();
        let files = TensorFiles::open(dir.path()).unwrap();
        assert_eq!(files.read_f32("b", &[2]).unwrap(), [7.0, 8.0]);
        assert_eq!(files.read_f32("a", &[2, 3]).unwrap(), a);
        let error = files.read_f32("a", &[3, 2]).unwrap_err().to_string();
        assert!(error.starts_with("tensor a in ") && error.ends_with("has shape [2, 3], expected [3, 2]"), "{error}");
        let error = files.read_f32("c", &[1]).unwrap_err().to_string();
        assert!(error.starts_with("tensor c not found (looked in ") && error.contains(SINGLE_FILE), "{error}");
    }

    #[test]
    fn a_slab_is_one_index_of_the_first_dimension() {
        let dir = tempfile::tempdir().unwrap();
        let fused: Vec<f32> = (0..12).map(|i| i as f32).collect();
        write_f32(&dir.path().join(SINGLE_FILE), &[("fused", vec![3, 2, 2], &fused)]).unwrap();
        let files = TensorFiles::open(dir.path()).unwrap();
        assert_eq!(files.read_slab("fused", &[3, 2, 2], 1).unwrap().to_f32(), [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(files.read_slab("fused", &[3, 2, 2], 2).unwrap().to_f32(), [8.0, 9.0, 10.0, 11.0]);
        assert!(files.read_slab("fused", &[3, 4], 0).unwrap_err().to_string().contains("expected [3, 4]"));
    }

    #[test]
    fn sharded_checkpoints_follow_the_index() {
        let dir = tempfile::tempdir().unwrap();
        write_f32(&dir.path().join("part-1.safetensors"), &[("x", vec![1], &[1.5])]).unwrap();
        write_f32(&dir.path().join("part-2.safetensors"), &[("y", vec![1], &[2.5])]).unwrap();
        let index = r#"{"metadata": {}, "weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}"#;
        std::fs::write(dir.path().join(INDEX_FILE), index).unwrap();
        let files = TensorFiles::open(dir.path()).unwrap();
        assert_eq!((files.read_f32("x", &[1]).unwrap(), files.read_f32("y", &[1]).unwrap()), (vec![1.5], vec![2.5]));
        assert!(files.read_f32("z", &[1]).unwrap_err().to_string().contains(INDEX_FILE));
    }

    #[test]
    fn truncated_files_and_unknown_dtypes_name_tensor_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        write_f32(&path, &[("w", vec![4], &[1.0, 2.0, 3.0, 4.0])]).unwrap();
        let length = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(length - 4).unwrap();
        let error = TensorFiles::open(dir.path()).unwrap().read_f32("w", &[4]).unwrap_err().to_string();
        assert!(error.starts_with("tensor w in ") && error.contains("truncated"), "{error}");

        let json = r#"{"q":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend_from_slice(&[1, 2]);
        std::fs::write(&path, bytes).unwrap();
        let error = TensorFiles::open(dir.path()).unwrap().read_f32("q", &[2]).unwrap_err().to_string();
        assert!(error.contains("has dtype I8"), "{error}");
    }

    /// A raw file of `header` and `data` bytes.
    fn raw_file(path: &Path, header: &str, data: &[u8]) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    /// Hostile headers are errors that name the file, never reads of the wrong bytes or panics:
    /// offsets near 2^64 (which used to wrap and read the header as weights), a shape whose element
    /// count wraps, overlapping tensors, ranges that run backwards.
    #[test]
    fn hostile_offsets_and_shapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        let read = |tensor: &str, shape: &[usize]| TensorFiles::open_file(&path).read_f32(tensor, shape);
        let near_max = u64::MAX - 4;
        raw_file(
            &path,
            &format!(r#"{{"w":{{"dtype":"F32","shape":[1],"data_offsets":[{near_max},{}]}}}}"#, u64::MAX),
            &[0; 4],
        );
        let error = read("w", &[1]).unwrap_err().to_string();
        assert!(error.contains("w: data_offsets do not start where"), "{error}");

        let huge = 1u64 << 31;
        raw_file(&path, &format!(r#"{{"w":{{"dtype":"F32","shape":[{huge},{huge}],"data_offsets":[0,0]}}}}"#), &[]);
        let error = read("w", &[huge as usize, huge as usize]).unwrap_err().to_string();
        assert!(error.contains("do not hold"), "{error}");

        // A file that is not a checkpoint: nothing of its content or size is echoed.
        std::fs::write(&path, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        let error = read("w", &[1]).unwrap_err().to_string();
        assert!(error.ends_with("its first 8 bytes are not the length of a header that fits the file"), "{error}");
        assert!(!error.contains("root:") && !error.contains("-byte"), "{error}");
        raw_file(&path, r#"{"w":{"dtype":"secret-value","shape":"also secret","data_offsets":[0,4]}}"#, &[0; 4]);
        let error = read("w", &[1]).unwrap_err().to_string();
        assert!(error.contains("w: not the expected fields and types") && !error.contains("secret"), "{error}");

        let overlapping = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        raw_file(&path, overlapping, &[0; 12]);
        let error = read("a", &[2]).unwrap_err().to_string();
        assert!(error.contains("b: data_offsets do not start where the tensor before ends"), "{error}");

        raw_file(&path, r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#, &[0; 8]);
        assert!(read("a", &[0]).unwrap_err().to_string().contains("a: data_offsets 8..4 do not hold [0] F32 values"));
        raw_file(&path, r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]);
        assert!(read("a", &[3]).unwrap_err().to_string().contains("a: data_offsets 0..8 do not hold [3] F32 values"));
    }

    /// An index may name only files of its own directory, and only regular files are read: a
    /// FIFO would block the reader forever.
    #[test]
    fn an_index_cannot_leave_its_directory_and_fifos_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        for shard in ["../other/model.safetensors", "/etc/passwd", "a/../../b"] {
            let index = format!(r#"{{"weight_map": {{"x": "{shard}"}}}}"#);
            std::fs::write(dir.path().join(INDEX_FILE), index).unwrap();
            let error = TensorFiles::open(dir.path()).unwrap_err().to_string();
            assert!(error.contains("is not a file name in this directory"), "{shard}: {error}");
        }
        std::fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
        let fifo = dir.path().join(SINGLE_FILE);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        let error = TensorFiles::open(dir.path()).unwrap().read_f32("x", &[1]).unwrap_err().to_string();
        assert!(error.contains("not a regular file"), "{error}");
    }
}
