//! `stasis validate` and `stasis up --dry-run`: the derived topology, or a
//! placed error and a non-zero exit; nothing started, nothing written.

use std::path::Path;
use std::process::{Command, Output};

fn stasis(state: &Path, images: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stasis"))
        .args(args)
        .env("STASIS_STATE_DIR", state)
        .env("STASIS_IMAGES", images)
        .output()
        .unwrap()
}

fn qcow2(path: &Path) {
    let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
    h.resize(4096, 0);
    std::fs::write(path, h).unwrap();
}

#[test]
fn validate_prints_the_topology_and_refuses_bad_images_in_place() {
    let d = tempfile::tempdir().unwrap();
    let (state, images) = (d.path().join("state"), d.path().join("images"));
    std::fs::create_dir_all(images.join("debian-12")).unwrap();
    qcow2(&images.join("debian-12/disk.qcow2"));
    let spec = d.path().join("lab.ns");
    std::fs::write(
        &spec,
        "set ns [new Simulator]\nforeach n {a b} { set $n [$ns node] }\ntb-set-node-os $a debian-12\n\
         tb-set-node-os $b UBUNTU22-64-STD\nset lan0 [$ns make-lan \"$a $b\" 100Mb 5ms]\n",
    )
    .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let out = stasis(&state, &images, &["validate", &s(&spec)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("a: 1G, 1 vCPU, image ") && text.contains("debian-12/disk.qcow2, firmware boot (os debian-12)"),
        "{text}"
    );
    assert!(text.contains("eth0 52:54:00:01:00:01 10.0.1.2/24 on lan0"), "{text}");
    assert!(text.contains("warning: node \"b\": no image for OS \"UBUNTU22-64-STD\""), "{text}");
    // --json: the same, for programs.
    let out = stasis(&state, &images, &["validate", "--json", &s(&spec)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"][1]["interfaces"][0]["address"], "10.0.1.2/24");
    // up --dry-run prints the same and starts nothing.
    let out = stasis(
        &state,
        &images,
        &["up", "--dry-run", &s(&spec), "--image", &format!("UBUNTU22-64-STD={}", s(&images.join("debian-12")))],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("b: 1G, 1 vCPU, image "));
    assert!(out.stderr.is_empty(), "the --image mapping leaves no warning: {}", String::from_utf8_lossy(&out.stderr));

    // Refusals: each placed file:line:column, exit 1.
    let refused = |body: &str, needles: &[&str]| {
        let f = d.path().join("bad.toml");
        std::fs::write(&f, body).unwrap();
        let out = stasis(&state, &images, &["validate", &s(&f)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.starts_with(&format!("stasis: error: {}:", f.display())), "{err}");
        for n in needles {
            assert!(err.contains(n), "{n:?} not in {err}");
        }
    };
    refused(
        "name = \"x\"\n[[node]]\nname = \"a\"\nimage = \"gone.qcow2\"\n",
        &[":4:9: node \"a\"", "gone.qcow2 does not exist"],
    );
    std::fs::write(d.path().join("disk.vmdk"), [b"KDMV".as_slice(), &[0u8; 508]].concat()).unwrap();
    refused("name = \"x\"\n[[node]]\nname = \"a\"\nimage = \"disk.vmdk\"\n", &["neither qcow2 nor raw: it is vmdk"]);
    // Without the reference image, an unmapped OS name has no default.
    std::fs::remove_dir_all(images.join("debian-12")).unwrap();
    refused("name = \"x\"\n[[node]]\nname = \"a\"\nos = \"FBSD-STD\"\n", &[":4:6:", "no default image"]);
    let out = stasis(&state, &images, &["up", "--dry-run", &s(&spec)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("lab.ns:3:") && err.contains("no image for OS \"debian-12\" and no default image"), "{err}");
    // (The state dir itself may be made, owner-only, by every command.)
    let left: Vec<_> = std::fs::read_dir(&state).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "validate and --dry-run write nothing: {left:?}");
}
