//! Root disk images of nodes: `image = "…"` (a qcow2 or raw file, or an
//! image directory), OS names (`os = "…"`, Emulab's `tb-set-node-os`)
//! mapped to images through the spec's `[images]` table, `stasis up
//! --image NAME=PATH` and the image directories, and the boot mode.
//! See docs/images.md.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::{Boot, Node, Resolver, SpecError, SpecErrorKind};

/// The OS name of the project's own guest (the Debian kernel and the busybox
/// initramfs, no root disk); `examples/gec8.ns` asks for it.
pub const BUILTIN_OS: &str = "STASIS";

/// Where OS names find images beyond the spec's own `[images]` table.
#[derive(Debug, Clone, Default)]
pub struct ImageCatalog {
    /// `stasis up --image NAME=PATH`: win over the spec's `[images]`.
    pub overrides: BTreeMap<String, PathBuf>,
    /// Directories holding images by name: `<dir>/<NAME>/` (an image
    /// directory, see [`ImageDir`]) or `<dir>/<NAME>.qcow2|.raw|.img`;
    /// searched in order after the spec's table.
    pub dirs: Vec<PathBuf>,
    /// The image an OS name that nothing maps falls back to (with a
    /// warning), when the spec has no `[defaults] image`.
    pub default: Option<PathBuf>,
    /// Check that every image exists and is qcow2 or raw (`stasis up`,
    /// `stasis validate`); off for re-reading a recorded spec.
    pub check_files: bool,
}

impl ImageCatalog {
    /// The image called `name` in the image directories: exact name first,
    /// then in lower case (`DEBIAN-12` finds `debian-12/`).
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        let lower = name.to_ascii_lowercase();
        for dir in &self.dirs {
            for n in [name, lower.as_str()] {
                let d = dir.join(n);
                if ImageDir::disk_in(&d).is_some() {
                    return Some(d);
                }
                for ext in ["qcow2", "raw", "img"] {
                    let f = dir.join(format!("{n}.{ext}"));
                    if f.is_file() {
                        return Some(f);
                    }
                }
            }
        }
        None
    }
}

/// An image directory, as `guest/debian/build.sh` writes it: `disk.qcow2`
/// (or `disk.raw`, `disk.img`) and, for direct kernel boot, `vmlinuz`,
/// `initrd.img` and `kernel-args` (its `root=…` command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDir {
    pub disk: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernel_args: Option<String>,
}

impl ImageDir {
    fn disk_in(dir: &Path) -> Option<PathBuf> {
        ["disk.qcow2", "disk.raw", "disk.img"].iter().map(|f| dir.join(f)).find(|p| p.is_file())
    }

    /// Reads the directory; `None` if it holds no disk.
    pub fn open(dir: &Path) -> Option<ImageDir> {
        let disk = ImageDir::disk_in(dir)?;
        let file = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
        let kernel_args = std::fs::read_to_string(dir.join("kernel-args"))
            .ok()
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|s| !s.is_empty());
        Some(ImageDir { disk, kernel: file("vmlinuz"), initrd: file("initrd.img"), kernel_args })
    }
}

/// A root disk's format: what QEMU is told when it reads the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// Why an image cannot be a node's root disk.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("image {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("cannot read image {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {} is neither qcow2 nor raw: it is {format} (convert it: qemu-img convert -O qcow2 …)", path.display())]
    OtherFormat { path: PathBuf, format: &'static str },
    #[error("image {} is qcow2 version {version}; QEMU reads versions 2 and 3", path.display())]
    Qcow2Version { path: PathBuf, version: u32 },
    #[error("image {} has a backing file; give the whole image (qemu-img convert -O qcow2 it into one file)", path.display())]
    BackingFile { path: PathBuf },
    #[error("image {} is {size} bytes, not a whole number of 512-byte sectors: not a raw disk", path.display())]
    RawSize { path: PathBuf, size: u64 },
}

/// Formats recognised by their first bytes, so they are refused instead of
/// being booted as raw disks.
const OTHER_FORMATS: &[(usize, &[u8], &str)] = &[
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "a vmdk descriptor"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc (VHD)"),
    (0, b"QED\0", "qed"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"\xfd7zXZ\0", "xz-compressed"),
    (0, b"\x1f\x8b", "gzip-compressed"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (0, b"BZh", "bzip2-compressed"),
    (0, b"PK\x03\x04", "a zip archive"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
    (257, b"ustar", "a tar archive"),
];

/// What a file is as a root disk: qcow2 (version 2 or 3, no backing file)
/// or raw (not one of the formats above, whole sectors).
pub fn probe_image(path: &Path) -> Result<ImageFormat, ImageError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ImageError::Missing { path: path.into() }),
        Err(source) => return Err(ImageError::Read { path: path.into(), source }),
    };
    if !meta.is_file() {
        return Err(ImageError::NotAFile { path: path.into() });
    }
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|source| ImageError::Read { path: path.into(), source })?;
    let be32 = |at: usize| head.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let be64 = |at: usize| head.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
    if head.starts_with(b"QFI\xfb") {
        let version = be32(4).unwrap_or(0);
        if !(2..=3).contains(&version) {
            return Err(ImageError::Qcow2Version { path: path.into(), version });
        }
        if be64(8).unwrap_or(0) != 0 {
            return Err(ImageError::BackingFile { path: path.into() });
        }
        return Ok(ImageFormat::Qcow2);
    }
    for (at, magic, format) in OTHER_FORMATS {
        if head.get(*at..at + magic.len()) == Some(*magic) {
            return Err(ImageError::OtherFormat { path: path.into(), format });
        }
    }
    if meta.len() == 0 || meta.len() % 512 != 0 {
        return Err(ImageError::RawSize { path: path.into(), size: meta.len() });
    }
    Ok(ImageFormat::Raw)
}

/// The image fields of a node or of `[defaults]`, as written.
#[derive(Default, Clone)]
pub(super) struct NodeImageRaw {
    pub image: Option<Spanned<String>>,
    pub os: Option<Spanned<String>>,
    pub boot: Option<Spanned<String>>,
}

fn is_os_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.len() <= 64
}

impl Resolver<'_> {
    /// Fills in `node.os`, `node.image` and `node.boot` (and, for an image
    /// directory booted directly, its kernel, initrd and `root=` arguments).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn node_image(
        &self,
        node: &mut Node,
        own: &NodeImageRaw,
        defaults: &NodeImageRaw,
        table: &BTreeMap<String, Spanned<String>>,
        explicit_kernel: bool,
        own_args: Option<&Spanned<String>>,
        warnings: &mut Vec<String>,
    ) -> Result<(), SpecError> {
        use SpecErrorKind::*;
        let subject = Some(format!("node \"{}\"", node.name));
        let error = |kind, span: std::ops::Range<usize>, field: &str, message: String| {
            self.src.error(kind, span, subject.clone(), Some(field), message)
        };
        let os = own.os.as_ref().or(defaults.os.as_ref());
        if let Some(os) = os {
            if !is_os_name(os.get_ref()) {
                return Err(error(
                    BadName,
                    os.span(),
                    "os",
                    format!("OS name \"{}\" must be 1..=64 of [A-Za-z0-9._-]", os.get_ref()),
                ));
            }
            node.os = Some(os.get_ref().clone());
        }
        // `[defaults] image`: for nodes without an image or OS of their own.
        let spec_default = || -> Result<Option<(std::ops::Range<usize>, PathBuf)>, SpecError> {
            defaults.image.as_ref().map(|i| Ok((i.span(), self.path(i, &subject, "image")?))).transpose()
        };
        // For an OS name nothing maps, the caller's default image after the spec's.
        let default_image = || -> Result<Option<(std::ops::Range<usize>, PathBuf)>, SpecError> {
            Ok(spec_default()?.or_else(|| self.catalog.default.clone().map(|p| (0..0, p))))
        };
        let image: Option<(std::ops::Range<usize>, PathBuf)> = if let Some(i) = &own.image {
            Some((i.span(), self.path(i, &subject, "image")?))
        } else if let Some(os) = os {
            let name = os.get_ref();
            if name.eq_ignore_ascii_case(BUILTIN_OS) {
                None
            } else if let Some(p) = self.catalog.overrides.get(name) {
                Some((os.span(), p.clone()))
            } else if let Some(p) = table.get(name) {
                Some((p.span(), self.path(p, &subject, "image")?))
            } else if let Some(p) = self.catalog.find(name) {
                Some((os.span(), p))
            } else if let Some((span, p)) = default_image()? {
                warnings.push(format!(
                    "node \"{}\": no image for OS \"{name}\" ([images] {name} = \"path\" or --image {name}=PATH); using the default image {}",
                    node.name,
                    p.display()
                ));
                Some((span, p))
            } else {
                return Err(error(
                    Image,
                    os.span(),
                    "os",
                    format!(
                        "no image for OS \"{name}\" and no default image: map it with [images] {name} = \"path\" \
                         or stasis up --image {name}=PATH, or give [defaults] image"
                    ),
                ));
            }
        } else {
            spec_default()?
        };

        let boot = match own.boot.as_ref().or(defaults.boot.as_ref()) {
            None => None,
            Some(b) => Some((
                b.span(),
                match b.get_ref().as_str() {
                    "firmware" => Boot::Firmware,
                    "kernel" => Boot::Kernel,
                    other => {
                        return Err(error(
                            OutOfRange,
                            b.span(),
                            "boot",
                            format!("unknown boot mode \"{other}\" (expected \"firmware\" or \"kernel\")"),
                        ))
                    }
                },
            )),
        };
        let Some((image_span, path)) = image else {
            if let Some((span, Boot::Firmware)) = boot {
                return Err(error(Image, span, "boot", "firmware boot needs an image (image = \"disk.qcow2\")".into()));
            }
            node.boot = Boot::Kernel;
            return Ok(());
        };
        let dir = if path.is_dir() {
            Some(ImageDir::open(&path).ok_or_else(|| {
                error(
                    Image,
                    image_span.clone(),
                    "image",
                    format!("image directory {} holds no disk.qcow2 (or disk.raw, disk.img)", path.display()),
                )
            })?)
        } else {
            None
        };
        let disk = dir.as_ref().map_or(path.clone(), |d| d.disk.clone());
        if self.catalog.check_files {
            probe_image(&disk).map_err(|e| error(Image, image_span.clone(), "image", e.to_string()))?;
        }
        node.image = Some(disk);
        node.boot = match boot {
            Some((_, b)) => b,
            None if explicit_kernel => Boot::Kernel,
            None => Boot::Firmware,
        };
        match node.boot {
            Boot::Firmware => {
                if let Some(a) = own_args {
                    return Err(error(
                        OutOfRange,
                        a.span(),
                        "kernel_args",
                        "kernel_args apply to boot = \"kernel\"; a firmware boot runs the image's own bootloader and its command line".into(),
                    ));
                }
                if explicit_kernel {
                    let span = boot.map_or(image_span, |(s, _)| s);
                    return Err(error(
                        OutOfRange,
                        span,
                        "boot",
                        "boot = \"firmware\" runs the image's bootloader: drop kernel and initrd, or boot = \"kernel\""
                            .into(),
                    ));
                }
                node.kernel_args.clear();
            }
            Boot::Kernel if !explicit_kernel => {
                let d = dir.as_ref().filter(|d| d.kernel.is_some() && d.initrd.is_some()).ok_or_else(|| {
                    error(
                        Image,
                        boot.map_or(image_span.clone(), |(s, _)| s),
                        "boot",
                        format!(
                            "boot = \"kernel\" needs kernel and initrd, or an image directory with vmlinuz and initrd.img ({} has none)",
                            path.display()
                        ),
                    )
                })?;
                node.kernel = d.kernel.clone();
                node.initrd = d.initrd.clone();
                let args = d.kernel_args.clone().unwrap_or_default();
                node.kernel_args = [args, std::mem::take(&mut node.kernel_args)]
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
            }
            Boot::Kernel => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
