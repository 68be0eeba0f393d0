//! Building blocks of a template build that need no network: the COPY step's files hash
//! (the cache key the service files the upload under) and the gzipped tar it uploads. The
//! operator's COPY sources come from ConfigMap data, so files are given in memory rather
//! than read from a build context on disk.

use std::collections::BTreeSet;
use std::io::Write;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use super::error::Error;
use super::models::TemplateStep;

/// The file-type bits of `st_mode` for a regular file; the SDK hashes the whole `st_mode`.
const S_IFREG: u32 = 0o100000;
/// Every entry gets the same timestamp so the archive depends on the content alone.
const FIXED_MTIME: u64 = 0;

/// One file of a build context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextFile {
    /// Relative to the context directory, `/`-separated, without `.` or `..` parts.
    pub path: String,
    /// Permission bits (for example `0o644`).
    pub mode: u32,
    pub contents: Bytes,
}

impl ContextFile {
    pub fn new(path: impl Into<String>, mode: u32, contents: impl Into<Bytes>) -> Self {
        ContextFile {
            path: path.into(),
            mode,
            contents: contents.into(),
        }
    }
}

/// A COPY step and the files it copies: `src` is relative to the context directory and the
/// files are those under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyLayer {
    src: String,
    dest: String,
    owner: Option<String>,
    mode: Option<u32>,
    files: Vec<ContextFile>,
}

impl CopyLayer {
    /// Validates the paths and sorts the files so the hash and the archive do not depend on
    /// the order they were given in.
    pub fn new(
        src: impl Into<String>,
        dest: impl Into<String>,
        mut files: Vec<ContextFile>,
    ) -> Result<Self, Error> {
        let src = src.into();
        let dest = dest.into();
        if dest.is_empty() {
            return Err(Error::InvalidArgument("COPY destination is empty".into()));
        }
        check_relative(&src)?;
        if files.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "no files to copy from {src}"
            )));
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut seen = BTreeSet::new();
        for file in &files {
            check_relative(&file.path)?;
            if !is_under(&file.path, &src) {
                return Err(Error::InvalidArgument(format!(
                    "{} is not under the COPY source {src}",
                    file.path
                )));
            }
            if !seen.insert(file.path.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "{} is listed twice",
                    file.path
                )));
            }
        }
        Ok(CopyLayer {
            src,
            dest,
            owner: None,
            mode: None,
            files,
        })
    }

    /// Owner of the copied files: `user` or `user:group`.
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Mode forced on the copied files at the destination.
    pub fn with_mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }

    pub fn files(&self) -> &[ContextFile] {
        &self.files
    }

    /// The SDK's files hash: SHA-256 over `COPY <src> <dest>`, then per file its relative
    /// path, `st_mode` and size in decimal, and its contents; lowercase hex.
    pub fn files_hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!("COPY {} {}", self.src, self.dest).as_bytes());
        for file in &self.files {
            hasher.update(file.path.as_bytes());
            hasher.update((S_IFREG | (file.mode & 0o7777)).to_string().as_bytes());
            hasher.update(file.contents.len().to_string().as_bytes());
            hasher.update(&file.contents);
        }
        hex(&hasher.finalize())
    }

    /// The upload: a gzipped tar with one entry per file, named relative to the context
    /// directory. The builder extracts with `tar -xz`, so it must be gzip.
    pub fn tar_gz(&self) -> Result<Bytes, Error> {
        let io = |error: std::io::Error| Error::InvalidArgument(format!("archive: {error}"));
        let mut archive = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        for file in &self.files {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(file.mode & 0o7777);
            header.set_size(file.contents.len() as u64);
            header.set_mtime(FIXED_MTIME);
            header.set_uid(0);
            header.set_gid(0);
            archive
                .append_data(&mut header, &file.path, &file.contents[..])
                .map_err(io)?;
        }
        let mut gzip = archive.into_inner().map_err(io)?;
        gzip.flush().map_err(io)?;
        Ok(Bytes::from(gzip.finish().map_err(io)?))
    }

    /// The build step that refers to this layer by its hash.
    pub fn step(&self) -> TemplateStep {
        let mut args = vec![self.src.clone(), self.dest.clone()];
        if self.owner.is_some() || self.mode.is_some() {
            args.push(self.owner.clone().unwrap_or_default());
            args.push(
                self.mode
                    .map(|mode| format!("{mode:04o}"))
                    .unwrap_or_default(),
            );
        }
        TemplateStep {
            kind: "COPY".into(),
            args,
            files_hash: Some(self.files_hash()),
            force: false,
        }
    }
}

fn check_relative(path: &str) -> Result<(), Error> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path.split('/').any(|part| part.is_empty() || part == "..");
    if bad {
        Err(Error::InvalidArgument(format!(
            "{path:?} is not a clean relative path"
        )))
    } else {
        Ok(())
    }
}

/// `.` means the whole context; otherwise the file is `src` itself or below it.
fn is_under(path: &str, src: &str) -> bool {
    src == "."
        || path == src
        || path
            .strip_prefix(src)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use flate2::read::GzDecoder;

    use super::*;

    fn layer() -> CopyLayer {
        CopyLayer::new(
            "files",
            "/app",
            vec![
                ContextFile::new("files/run.sh", 0o755, "#!/bin/sh\necho hi\n"),
                ContextFile::new("files/a.txt", 0o644, "hello\n"),
            ],
        )
        .unwrap()
    }

    /// Expected value computed independently with Python's hashlib:
    /// h = sha256(b"COPY files /app"); then for (path, mode, data) in sorted files:
    /// h.update(path); h.update(str(0o100000 | mode)); h.update(str(len(data))); h.update(data)
    #[test]
    fn files_hash_matches_an_independent_computation() {
        assert_eq!(
            layer().files_hash(),
            "3d6ac34de9cb5411d3e799e543d0fc07e5c7775f9e4dd9a517a637cbf4ee04d7"
        );
    }

    #[test]
    fn files_hash_ignores_input_order_but_not_modes() {
        let mut reversed = layer().files().to_vec();
        reversed.reverse();
        let again = CopyLayer::new("files", "/app", reversed).unwrap();
        assert_eq!(again.files_hash(), layer().files_hash());
        let mut files = layer().files().to_vec();
        files[0].mode = 0o600;
        let changed = CopyLayer::new("files", "/app", files).unwrap();
        assert_ne!(changed.files_hash(), layer().files_hash());
        let moved = CopyLayer::new("files", "/srv", layer().files().to_vec()).unwrap();
        assert_ne!(moved.files_hash(), layer().files_hash());
    }

    #[test]
    fn archive_holds_each_file_with_its_mode() {
        let archive = layer().tar_gz().unwrap();
        assert_eq!(&archive[..2], &[0x1f, 0x8b], "gzip magic");
        let mut tar = tar::Archive::new(GzDecoder::new(&archive[..]));
        let mut seen = Vec::new();
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mode = entry.header().mode().unwrap();
            let mut contents = String::new();
            entry.read_to_string(&mut contents).unwrap();
            seen.push((path, mode, contents));
        }
        assert_eq!(
            seen,
            vec![
                ("files/a.txt".to_owned(), 0o644, "hello\n".to_owned()),
                (
                    "files/run.sh".to_owned(),
                    0o755,
                    "#!/bin/sh\necho hi\n".to_owned()
                ),
            ]
        );
        assert_eq!(layer().tar_gz().unwrap(), archive, "deterministic");
    }

    #[test]
    fn step_refers_to_the_hash() {
        let step = layer().step();
        assert_eq!(step.kind, "COPY");
        assert_eq!(step.args, vec!["files", "/app"]);
        assert_eq!(step.files_hash, Some(layer().files_hash()));
        let owned = layer().with_owner("user:user").with_mode(0o755).step();
        assert_eq!(owned.args, vec!["files", "/app", "user:user", "0755"]);
    }

    #[test]
    fn paths_are_checked() {
        let file = |path: &str| vec![ContextFile::new(path, 0o644, "x")];
        assert!(CopyLayer::new("files", "/app", file("files/../etc/passwd")).is_err());
        assert!(CopyLayer::new("files", "/app", file("/etc/passwd")).is_err());
        assert!(CopyLayer::new("files", "/app", file("filesystem/x")).is_err());
        assert!(CopyLayer::new("files", "/app", vec![]).is_err());
        assert!(CopyLayer::new("files", "", file("files/x")).is_err());
        assert!(CopyLayer::new(".", "/app", file("any/x")).is_ok());
        assert!(CopyLayer::new("files/x", "/app/x", file("files/x")).is_ok());
        let twice = vec![
            ContextFile::new("files/x", 0o644, "1"),
            ContextFile::new("files/x", 0o600, "2"),
        ];
        assert!(CopyLayer::new("files", "/app", twice).is_err());
    }
}
