use super::*;
use std::io::Read;

const SPEC: &str = r#"name = "lab"
[[node]]
name = "a"
run = ["chronyd -x", "echo 'it''s' \"quoted\" $HOME; true"]
[[node]]
name = "b"
[[node]]
name = "c"
[[lan]]
name = "lan0"
members = ["a", "b", "c"]
[[link]]
name = "l0"
a = "a"
b = "c"
ips = ["192.168.7.1/30", "192.168.7.2/30"]
"#;

fn seed(node: &str, keys: &[String]) -> Seed {
    let exp = Experiment::from_toml_str(SPEC, None).unwrap();
    Seed::for_node(&exp, exp.node(node).unwrap(), keys)
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn network_config_has_every_interface_of_the_spec() {
    let exp = Experiment::from_toml_str(SPEC, None).unwrap();
    for node in &exp.nodes {
        let s = Seed::for_node(&exp, node, &[]);
        let doc = json_of(&s.network_config());
        assert_eq!(doc["version"], 2);
        let eths = doc["ethernets"].as_object().unwrap();
        assert_eq!(eths.len(), node.ifaces.len(), "{doc}");
        for i in &node.ifaces {
            let e = &eths[&i.name];
            assert_eq!(e["match"]["macaddress"], i.mac.as_str());
            assert_eq!(e["set-name"], i.name.as_str());
            assert_eq!(e["addresses"], json!([format!("{}/{}", i.ip, i.prefix_len)]));
            assert_eq!((e["dhcp4"].as_bool(), e["dhcp6"].as_bool()), (Some(false), Some(false)));
        }
    }
    let a = seed("a", &[]);
    assert_eq!(a.interfaces[1].addresses, ["192.168.7.1/30"]);
    assert_eq!(a.interfaces[1].mac, "52:54:00:00:01:01");
}

#[test]
fn user_data_runs_every_command_as_an_argument_then_says_ready() {
    let s = seed("a", &[]);
    let text = s.user_data();
    let body = text.strip_prefix("#cloud-config\n").expect("cloud-config header");
    let doc = json_of(body);
    assert_eq!(doc["hostname"], "a");
    let runcmd = doc["runcmd"].as_array().unwrap();
    assert_eq!(runcmd.len(), 3);
    // The command travels as $1 of a fixed shell line: no quoting to get wrong.
    assert_eq!(runcmd[1][4], "echo 'it''s' \"quoted\" $HOME; true");
    assert_eq!(runcmd[0][2], "setsid sh -c \"$1\" </dev/null >/dev/ttyS0 2>&1 &");
    assert_eq!(runcmd[2][4], "STASIS-READY node=a");
    assert!(doc.get("ssh_authorized_keys").is_none() && doc.get("disable_root").is_none());
    let keyed = seed("b", &["ssh-ed25519 AAAA user@host".into()]);
    let doc = json_of(keyed.user_data().strip_prefix("#cloud-config\n").unwrap());
    assert_eq!(doc["ssh_authorized_keys"], json!(["ssh-ed25519 AAAA user@host"]));
    assert_eq!(doc["disable_root"], false);
    let meta = json_of(&keyed.meta_data());
    assert_eq!((meta["instance-id"].as_str(), meta["local-hostname"].as_str()), (Some("stasis-lab-b"), Some("b")));
}

#[test]
fn the_image_is_a_cidata_fat_volume_with_the_three_documents() {
    let s = seed("a", &[]);
    let img = s.fat_image().unwrap();
    assert_eq!(img.len() as u64, MIN_IMAGE_BYTES);
    assert_eq!(img, s.fat_image().unwrap(), "the same seed gives the same bytes");
    assert_ne!(img, seed("b", &[]).fat_image().unwrap());
    let mut cur = Cursor::new(img);
    let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.volume_label().trim_end(), LABEL);
    let root = fs.root_dir();
    for (name, want) in
        [("meta-data", s.meta_data()), ("user-data", s.user_data()), ("network-config", s.network_config())]
    {
        let mut got = String::new();
        root.open_file(name).unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn a_seed_too_large_is_refused_and_written_images_are_owner_only() {
    let mut s = seed("a", &[]);
    s.run = vec!["x".repeat(9 << 20)];
    assert!(matches!(s.fat_image(), Err(SeedError::TooLarge { .. })));
    s.run = vec!["y".repeat(2 << 20)];
    assert!(s.fat_image().unwrap().len() as u64 > MIN_IMAGE_BYTES, "grows with its documents");
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("seed.img");
    seed("a", &[]).write_image(&p).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&p).unwrap(), seed("a", &[]).fat_image().unwrap());
    let e = seed("a", &[]).write_image(&d.path().join("no/such/dir/seed.img")).unwrap_err();
    assert!(e.to_string().contains("no/such/dir/seed.img"), "{e}");
}
