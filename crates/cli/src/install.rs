//! Where an installed or a build-tree `stasis` finds its parts
//! (docs/images.md, "Installing"): the busybox guest image, the delay node,
//! and the OS image directories searched by name.
//!
//! | what | environment | installed (`make install`) | build tree |
//! |---|---|---|---|
//! | guest image | `STASIS_IMAGE_DIR` | `PREFIX/share/stasis/guest` | `target/guest` |
//! | delay node | `STASIS_DELAY_NODE` | `PREFIX/bin/delay-node` | `target/debug/delay-node` |
//! | OS images | `STASIS_IMAGES` (`:`-separated) | `$XDG_DATA_HOME/stasis/images` (default `~/.local/share/stasis/images`), then `PREFIX/share/stasis/images` | then `target/images` |
//!
//! The reference image (`debian-12`) is the default image for OS names
//! nothing maps, when one of the directories has it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use stasis_core::spec::ImageCatalog;

/// The image an unmapped OS name falls back to, when installed.
pub const REFERENCE_IMAGE: &str = "debian-12";

/// The parts of an installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    /// Holds `vmlinuz` and `initrd.img` of the busybox guest.
    pub guest_dir: PathBuf,
    pub delay_node: PathBuf,
    /// Searched in order for images by name.
    pub image_dirs: Vec<PathBuf>,
}

impl Installation {
    /// The layout for the binary in `bin_dir`, with environment lookups
    /// through `env`.
    pub fn locate(bin_dir: &Path, env: &dyn Fn(&str) -> Option<OsString>) -> Installation {
        // PREFIX/bin → PREFIX, target/debug → target.
        let prefix = bin_dir.parent().map_or_else(|| bin_dir.join(".."), Path::to_path_buf);
        let installed = prefix.join("share").join("stasis");
        let guest_dir = env("STASIS_IMAGE_DIR").map(PathBuf::from).unwrap_or_else(|| {
            let i = installed.join("guest");
            if i.join("vmlinuz").is_file() {
                i
            } else {
                prefix.join("guest")
            }
        });
        let delay_node = env("STASIS_DELAY_NODE").map(PathBuf::from).unwrap_or_else(|| bin_dir.join("delay-node"));
        let image_dirs = match env("STASIS_IMAGES") {
            Some(list) => std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()).collect(),
            None => {
                let data = env("XDG_DATA_HOME")
                    .map(PathBuf::from)
                    .filter(|p| p.is_absolute())
                    .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".local").join("share")));
                data.map(|d| d.join("stasis").join("images"))
                    .into_iter()
                    .chain([installed.join("images"), prefix.join("images")])
                    .collect()
            }
        };
        Installation { guest_dir, delay_node, image_dirs }
    }

    /// The catalog `stasis up` and `stasis validate` resolve images with:
    /// the image directories, `--image NAME=PATH` overrides, the reference
    /// image as default when found, files checked.
    pub fn catalog(&self, overrides: impl IntoIterator<Item = (String, PathBuf)>) -> ImageCatalog {
        let mut c = ImageCatalog { dirs: self.image_dirs.clone(), check_files: true, ..ImageCatalog::default() };
        c.default = c.find(REFERENCE_IMAGE);
        c.overrides = overrides.into_iter().collect();
        c
    }
}

/// `NAME=PATH` of `stasis up --image` (relative paths against the current directory).
pub fn parse_image_override(arg: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = arg.split_once('=').ok_or_else(|| format!("--image {arg:?}: expected NAME=PATH"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("--image {arg:?}: expected NAME=PATH"));
    }
    let path = std::path::absolute(path).map_err(|e| format!("--image {arg:?}: {e}"))?;
    Ok((name.to_owned(), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_build_tree_finds_target_guest_and_images() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("target/debug");
        std::fs::create_dir_all(&bin).unwrap();
        let i = Installation::locate(&bin, &env_of(&[("HOME", "/home/u")]));
        assert_eq!(i.guest_dir, d.path().join("target/guest"));
        assert_eq!(i.delay_node, bin.join("delay-node"));
        assert_eq!(
            i.image_dirs,
            [
                PathBuf::from("/home/u/.local/share/stasis/images"),
                d.path().join("target/share/stasis/images"),
                d.path().join("target/images")
            ]
        );
    }

    #[test]
    fn an_installation_finds_share_stasis_and_the_reference_image() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("usr/local/bin");
        let share = d.path().join("usr/local/share/stasis");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(share.join("guest")).unwrap();
        std::fs::write(share.join("guest/vmlinuz"), b"k").unwrap();
        std::fs::create_dir_all(share.join("images/debian-12")).unwrap();
        std::fs::write(share.join("images/debian-12/disk.qcow2"), b"QFI\xfb").unwrap();
        let i = Installation::locate(&bin, &env_of(&[("XDG_DATA_HOME", "/data")]));
        assert_eq!(i.guest_dir, share.join("guest"));
        assert_eq!(i.image_dirs[0], PathBuf::from("/data/stasis/images"));
        let c = i.catalog([("X".to_owned(), PathBuf::from("/x.qcow2"))]);
        assert_eq!(c.default, Some(share.join("images/debian-12")));
        assert_eq!(c.overrides["X"], PathBuf::from("/x.qcow2"));
        assert!(c.check_files);
        // The environment wins; an empty STASIS_IMAGES entry is ignored.
        let i = Installation::locate(&bin, &env_of(&[("STASIS_IMAGES", "/a::/b"), ("STASIS_IMAGE_DIR", "/g")]));
        assert_eq!(i.image_dirs, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(i.guest_dir, PathBuf::from("/g"));
        assert_eq!(i.catalog([]).default, None);
    }

    #[test]
    fn image_overrides_are_name_equals_path() {
        let (n, p) = parse_image_override("UBUNTU22-64-STD=/i/u.qcow2").unwrap();
        assert_eq!((n.as_str(), p), ("UBUNTU22-64-STD", PathBuf::from("/i/u.qcow2")));
        assert!(parse_image_override("nopath").unwrap_err().contains("NAME=PATH"));
        assert!(parse_image_override("=x").is_err());
    }
}
