//! Where image files are read from: a directory (an OCI layout, the pull cache) or a
//! `docker save` tarball, read in place: one pass indexes its members, then each is
//! read from its offset without unpacking the archive.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub enum Store {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        /// Normalised member name → (data offset, size).
        members: HashMap<String, (u64, u64)>,
    },
}

/// `./a//b` and `a/b` name the same member.
fn normalise(name: &str) -> String {
    Path::new(name)
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl Store {
    pub fn dir(path: &Path) -> Store {
        Store::Dir(path.to_path_buf())
    }

    pub fn tar(path: &Path) -> Result<Store> {
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        let entries = archive
            .entries()
            .ctx(|| format!("reading {}", path.display()))?;
        for entry in entries {
            let entry = entry.ctx(|| format!("reading {}", path.display()))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().ctx(|| format!("reading {}", path.display()))?;
            members.insert(
                normalise(&name.to_string_lossy()),
                (entry.raw_file_position(), entry.size()),
            );
        }
        if members.is_empty() {
            return Err(Error::Invalid(format!(
                "{} is not a docker save archive (no files in it)",
                path.display()
            )));
        }
        Ok(Store::Tar {
            path: path.to_path_buf(),
            members,
        })
    }

    /// What the user named, for messages.
    pub fn describe(&self) -> String {
        match self {
            Store::Dir(p) | Store::Tar { path: p, .. } => p.display().to_string(),
        }
    }

    pub fn exists(&self, rel: &str) -> bool {
        match self {
            Store::Dir(root) => root.join(normalise(rel)).is_file(),
            Store::Tar { members, .. } => members.contains_key(&normalise(rel)),
        }
    }

    /// Opens the member `rel`; a missing one is [`Error::NotFound`].
    pub fn open(&self, rel: &str) -> Result<Box<dyn Read + '_>> {
        let rel = normalise(rel);
        match self {
            Store::Dir(root) => {
                let path = root.join(&rel);
                match File::open(&path) {
                    Ok(f) => Ok(Box::new(f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Err(Error::NotFound(format!("{rel} in {}", root.display())))
                    }
                    Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
                }
            }
            Store::Tar { path, members } => {
                let (offset, size) = *members
                    .get(&rel)
                    .ok_or_else(|| Error::NotFound(format!("{rel} in {}", path.display())))?;
                let mut f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
                f.seek(SeekFrom::Start(offset))
                    .ctx(|| format!("reading {}", path.display()))?;
                Ok(Box::new(f.take(size)))
            }
        }
    }

    pub fn read(&self, rel: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open(rel)?
            .read_to_end(&mut out)
            .ctx(|| format!("reading {rel} in {}", self.describe()))?;
        Ok(out)
    }
}
