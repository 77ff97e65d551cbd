//! Applying one layer: decompress, walk its tar entries in order, turn whiteouts into
//! removals and everything else into [`Tree`] entries, and check the uncompressed
//! stream against the config's diff_id.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::digest::HashingReader;
use crate::error::{Error, IoContext, Result};
use crate::layout::Compression;
use crate::tree::{clean_entry_path, Kind, Meta, Tree};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The decompressed stream of a layer.
fn decompress<'a>(raw: Box<dyn Read + 'a>, c: Compression) -> Result<Box<dyn Read + 'a>> {
    let mut buffered = BufReader::with_capacity(256 * 1024, raw);
    let c = match c {
        Compression::Sniff => {
            let head = buffered.fill_buf().ctx(|| "reading a layer".into())?;
            if head.starts_with(&[0x1f, 0x8b]) {
                Compression::Gzip
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Compression::Zstd
            } else {
                Compression::None
            }
        }
        other => other,
    };
    Ok(match c {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered).ctx(|| "starting zstd".into())?,
        ),
        Compression::None | Compression::Sniff => Box::new(buffered),
    })
}

/// Applies the layer `name` read from `raw` onto `tree`.
pub fn apply_layer(
    tree: &mut Tree,
    name: &str,
    raw: Box<dyn Read + '_>,
    compression: Compression,
    diff_id: Option<&str>,
) -> Result<()> {
    tree.begin_layer();
    let stream = HashingReader::new(decompress(raw, compression)?);
    let mut archive = tar::Archive::new(stream);
    let ctx = |what: &str| format!("{what} layer {name}");
    {
        let entries = archive.entries().ctx(|| ctx("reading"))?;
        for entry in entries {
            let mut entry = entry.ctx(|| ctx("reading"))?;
            apply_entry(tree, &mut entry).map_err(|e| match e {
                Error::PathEscape(m) => Error::PathEscape(format!("{m} (in layer {name})")),
                other => other,
            })?;
        }
    }
    let (actual, _) = archive.into_inner().finish().ctx(|| ctx("reading"))?;
    if let Some(expected) = diff_id {
        if actual != expected {
            return Err(Error::Digest {
                what: format!("uncompressed layer {name} (its diff_id)"),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(())
}

fn apply_entry<R: Read>(tree: &mut Tree, entry: &mut tar::Entry<'_, R>) -> Result<()> {
    let raw_path = entry
        .path()
        .ctx(|| "reading an entry's path".into())?
        .into_owned();
    let rel = clean_entry_path(&raw_path)?;
    let Some(file_name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(()); // `./`: the root itself keeps the converter's metadata
    };
    let header = entry.header().clone();
    let kind_of = header.entry_type();

    // Whiteouts: markers, never files of the result.
    if file_name == OPAQUE {
        let dir = tree.place(&rel)?;
        return tree.make_opaque(dir.parent().unwrap_or(Path::new("")));
    }
    if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
        if matches!(hidden, "" | "." | "..") {
            return Err(Error::PathEscape(format!(
                "{}: whiteout of {hidden:?}",
                rel.display()
            )));
        }
        let victim = rel.with_file_name(hidden);
        clean_entry_path(&victim)?;
        let placed = tree.place(&victim)?;
        return tree.remove(&placed);
    }

    let placed = tree.place(&rel)?;
    let meta = |kind: Kind| -> Result<Meta> {
        Ok(Meta {
            kind,
            uid: header.uid().ctx(|| format!("reading {}", rel.display()))?,
            gid: header.gid().ctx(|| format!("reading {}", rel.display()))?,
            mode: header.mode().ctx(|| format!("reading {}", rel.display()))? & 0o7777,
            mtime: header
                .mtime()
                .ctx(|| format!("reading {}", rel.display()))?,
            xattrs: Vec::new(),
        })
    };
    use tar::EntryType as T;
    let kind = match kind_of {
        T::Regular | T::Continuous | T::GNUSparse => Kind::File,
        T::Directory => Kind::Dir,
        T::Symlink => {
            let target = entry
                .link_name()
                .ctx(|| format!("reading {}", rel.display()))?
                .ok_or_else(|| {
                    Error::Invalid(format!("{}: symlink without target", rel.display()))
                })?;
            Kind::Symlink(target.into_owned())
        }
        T::Link => {
            let target = entry
                .link_name()
                .ctx(|| format!("reading {}", rel.display()))?
                .ok_or_else(|| {
                    Error::Invalid(format!("{}: hard link without target", rel.display()))
                })?;
            let target = clean_entry_path(&target)
                .map_err(|e| Error::PathEscape(format!("hard link {}: {e}", rel.display())))?;
            return tree.add_hardlink(&placed, &target);
        }
        T::Char | T::Block => {
            let ma = header.device_major().ok().flatten().unwrap_or(0);
            let mi = header.device_minor().ok().flatten().unwrap_or(0);
            if kind_of == T::Char {
                Kind::Char(ma, mi)
            } else {
                Kind::Block(ma, mi)
            }
        }
        T::Fifo => Kind::Fifo,
        other => {
            tree.skipped
                .push(format!("/{} (tar entry type {other:?})", rel.display()));
            return Ok(());
        }
    };
    let mut m = meta(kind)?;
    if let Some(exts) = entry
        .pax_extensions()
        .ctx(|| format!("reading {}", rel.display()))?
    {
        for ext in exts {
            let ext = ext.ctx(|| format!("reading {}", rel.display()))?;
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                m.xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
            }
        }
        m.xattrs.sort();
    }
    tree.add(&placed, m, entry)
}
