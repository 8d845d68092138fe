use super::super::{Boot, Experiment, ImageCatalog, SpecErrorKind};
use super::{probe_image, ImageError, ImageFormat};
use std::path::Path;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// A qcow2 header: magic, version, backing file offset.
fn qcow2(version: u32, backing: u64) -> Vec<u8> {
    let mut h = b"QFI\xfb".to_vec();
    h.extend(version.to_be_bytes());
    h.extend(backing.to_be_bytes());
    h.resize(4096, 0);
    h
}

#[test]
fn images_are_qcow2_or_raw() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    write(&p("a.qcow2"), &qcow2(3, 0));
    write(&p("v2.qcow2"), &qcow2(2, 0));
    write(&p("raw.img"), &vec![0u8; 1 << 20]);
    assert_eq!(probe_image(&p("a.qcow2")).unwrap(), ImageFormat::Qcow2);
    assert_eq!(probe_image(&p("v2.qcow2")).unwrap(), ImageFormat::Qcow2);
    assert_eq!(probe_image(&p("raw.img")).unwrap(), ImageFormat::Raw);
    write(&p("v9.qcow2"), &qcow2(9, 0));
    assert!(matches!(probe_image(&p("v9.qcow2")), Err(ImageError::Qcow2Version { version: 9, .. })));
    write(&p("child.qcow2"), &qcow2(3, 512));
    assert!(matches!(probe_image(&p("child.qcow2")), Err(ImageError::BackingFile { .. })));
    let mut vmdk = b"KDMV".to_vec();
    vmdk.resize(4096, 0);
    write(&p("x.vmdk"), &vmdk);
    let e = probe_image(&p("x.vmdk")).unwrap_err();
    assert!(e.to_string().contains("neither qcow2 nor raw: it is vmdk"), "{e}");
    let mut vdi = vec![0u8; 4096];
    vdi[64..68].copy_from_slice(b"\x7f\x10\xda\xbe");
    write(&p("x.vdi"), &vdi);
    assert!(matches!(probe_image(&p("x.vdi")), Err(ImageError::OtherFormat { format: "vdi", .. })));
    let mut xz = b"\xfd7zXZ\0".to_vec();
    xz.resize(4096, 1);
    write(&p("disk.img.xz"), &xz);
    assert!(matches!(probe_image(&p("disk.img.xz")), Err(ImageError::OtherFormat { format: "xz-compressed", .. })));
    write(&p("odd.img"), &[0u8; 1000]);
    assert!(matches!(probe_image(&p("odd.img")), Err(ImageError::RawSize { size: 1000, .. })));
    assert!(matches!(probe_image(&p("none.qcow2")), Err(ImageError::Missing { .. })));
    assert!(matches!(probe_image(d.path()), Err(ImageError::NotAFile { .. })));
}

fn checked() -> ImageCatalog {
    ImageCatalog { check_files: true, ..ImageCatalog::default() }
}

fn spec(dir: &Path, body: &str) -> Result<Experiment, super::SpecError> {
    let file = dir.join("x.toml");
    write(&file, format!("name = \"x\"\n{body}").as_bytes());
    Experiment::from_file_with(&file, &checked())
}

#[test]
fn image_mistakes_are_placed_and_named() {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("disk.vmdk"), &{
        let mut v = b"KDMV".to_vec();
        v.resize(4096, 0);
        v
    });
    let e = spec(d.path(), "[[node]]\nname = \"a\"\nimage = \"gone.qcow2\"\n").unwrap_err();
    assert_eq!((e.kind, e.line, e.column), (SpecErrorKind::Image, 4, 9), "{e}");
    assert!(e.to_string().contains("gone.qcow2 does not exist"), "{e}");
    let e = spec(d.path(), "[[node]]\nname = \"a\"\nimage = \"disk.vmdk\"\n").unwrap_err();
    assert!(e.to_string().contains("neither qcow2 nor raw"), "{e}");
    assert!(e.to_string().starts_with(&format!("{}:4:9: node \"a\"", d.path().join("x.toml").display())), "{e}");
    // [defaults] image, and an unmapped OS with it.
    let e = spec(d.path(), "[defaults]\nimage = \"nope.raw\"\n[[node]]\nname = \"a\"\n").unwrap_err();
    assert_eq!((e.kind, e.line), (SpecErrorKind::Image, 3), "{e}");
    let e = spec(d.path(), "[[node]]\nname = \"a\"\nos = \"UBUNTU22-64-STD\"\n").unwrap_err();
    assert_eq!((e.kind, e.line, e.column), (SpecErrorKind::Image, 4, 6), "{e}");
    assert!(e.to_string().contains("[images] UBUNTU22-64-STD = \"path\""), "{e}");
    let e = spec(d.path(), "[images]\nU = \"u.qcow2\"\n[[node]]\nname = \"a\"\nos = \"U\"\n").unwrap_err();
    assert_eq!((e.kind, e.line), (SpecErrorKind::Image, 3), "the table's entry is placed: {e}");
    // Boot modes that cannot work.
    write(&d.path().join("plain.qcow2"), &qcow2(3, 0));
    let e = spec(d.path(), "[[node]]\nname = \"a\"\nboot = \"firmware\"\n").unwrap_err();
    assert!(e.to_string().contains("firmware boot needs an image"), "{e}");
    let e = spec(d.path(), "[[node]]\nname = \"a\"\nimage = \"plain.qcow2\"\nboot = \"kernel\"\n").unwrap_err();
    assert!(e.to_string().contains("boot = \"kernel\" needs kernel and initrd"), "{e}");
    let e = spec(d.path(), "[[node]]\nname = \"a\"\nimage = \"plain.qcow2\"\nboot = \"bios\"\n").unwrap_err();
    assert_eq!(e.kind, SpecErrorKind::OutOfRange, "{e}");
    let e = spec(d.path(), "[[node]]\nname = \"a\"\nimage = \"plain.qcow2\"\nkernel_args = \"x=1\"\n").unwrap_err();
    assert!(e.to_string().contains("kernel_args apply to boot = \"kernel\""), "{e}");
    let e = spec(d.path(), "[[node]]\nname = \"a\"\nos = \"bad name!\"\n").unwrap_err();
    assert_eq!(e.kind, SpecErrorKind::BadName, "{e}");
}

#[test]
fn images_resolve_by_path_table_override_directory_and_default() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("images");
    std::fs::create_dir_all(img.join("debian-12")).unwrap();
    write(&img.join("debian-12/disk.qcow2"), &qcow2(3, 0));
    write(&img.join("debian-12/vmlinuz"), b"k");
    write(&img.join("debian-12/initrd.img"), b"i");
    write(&img.join("debian-12/kernel-args"), b"root=UUID=1234 ro\n");
    write(&img.join("alpine.raw"), &vec![0u8; 4096]);
    write(&d.path().join("mine.qcow2"), &qcow2(3, 0));
    let mut cat = checked();
    cat.dirs.push(img.clone());
    cat.overrides.insert("OVER".into(), d.path().join("mine.qcow2"));
    let text = format!(
        "name = \"x\"\n[images]\nTABLE = \"mine.qcow2\"\nOVER = \"missing.qcow2\"\n\
         [[node]]\nname = \"fw\"\nos = \"DEBIAN-12\"\n\
         [[node]]\nname = \"direct\"\nos = \"debian-12\"\nboot = \"kernel\"\nkernel_args = \"quiet\"\n\
         [[node]]\nname = \"raw\"\nos = \"alpine\"\n\
         [[node]]\nname = \"table\"\nos = \"TABLE\"\n\
         [[node]]\nname = \"over\"\nos = \"OVER\"\n\
         [[node]]\nname = \"path\"\nimage = \"{}\"\n\
         [[node]]\nname = \"busybox\"\n",
        img.join("debian-12").display()
    );
    let file = d.path().join("x.toml");
    write(&file, text.as_bytes());
    let e = Experiment::from_file_with(&file, &cat).unwrap();
    let n = |name: &str| e.node(name).unwrap();
    assert_eq!(n("fw").image.as_deref(), Some(img.join("debian-12/disk.qcow2").as_path()));
    assert_eq!((n("fw").boot, n("fw").kernel.as_ref()), (Boot::Firmware, None));
    assert_eq!(n("direct").boot, Boot::Kernel);
    assert_eq!(n("direct").kernel.as_deref(), Some(img.join("debian-12/vmlinuz").as_path()));
    assert_eq!(n("direct").initrd.as_deref(), Some(img.join("debian-12/initrd.img").as_path()));
    assert_eq!(n("direct").kernel_args, "root=UUID=1234 ro quiet");
    assert_eq!(n("raw").image.as_deref(), Some(img.join("alpine.raw").as_path()));
    assert_eq!(n("table").image.as_deref(), Some(d.path().join("mine.qcow2").as_path()));
    assert_eq!(n("over").image.as_deref(), Some(d.path().join("mine.qcow2").as_path()), "--image wins over [images]");
    assert_eq!(n("path").image, n("fw").image, "an image directory by path");
    assert_eq!((n("busybox").image.as_ref(), n("busybox").boot), (None, Boot::Kernel));
    assert!(e.warnings.is_empty(), "{:?}", e.warnings);
    // The canonical form re-reads as the same experiment, without the
    // catalog: every image is resolved in it.
    let again = Experiment::from_toml_str(&e.to_toml(), None).unwrap();
    assert_eq!(again.nodes, e.nodes);
    assert_eq!(again.digest(), e.digest());
}

#[test]
fn busybox_specs_keep_their_canonical_form() {
    let t = "name = \"x\"\n[[node]]\nname = \"a\"\n";
    let e = Experiment::from_toml_str(t, None).unwrap();
    assert!(!e.to_toml().contains("image") && !e.to_toml().contains("boot"), "{}", e.to_toml());
}
