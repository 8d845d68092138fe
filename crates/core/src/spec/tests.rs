use super::*;
use proptest::prelude::*;

const EXAMPLE: &str = r#"name = "three-on-a-lan"
[defaults]
memory = "512MiB"
vcpus = 2

[[node]]
name = "a"
memory = "256M"
vcpus = 1
kernel = "img/vmlinuz"
initrd = "/abs/initrd.img"
kernel_args = "quiet"
run = ["stasis-probe --interval-ms 10", "stasis-traffic recv --port 5000"]

[[node]]
name = "b"

[[node]]
name = "c"
memory = "1G"

[[lan]]
name = "lan0"
members = ["a", "b", "c"]
bandwidth = "100Mb"
delay = "10ms"
loss = 0.0
jitter = "0ms"
queue = 50

[[link]]
name = "l0"
a = "a"
b = "b"
bandwidth = "10Mb"
delay = "5ms"
[link.b_to_a]
delay = "7ms"
loss = 0.25
"#;

fn parse(text: &str) -> Result<Experiment, SpecError> {
    Experiment::from_toml_str(text, Some(Path::new("three.toml")))
}

/// Parses `text`, expects a refusal of `kind`, and checks the rendered
/// message names `three.toml:<line>:` and contains every `needle`.
fn refused(text: &str, kind: SpecErrorKind, line: usize, needles: &[&str]) -> SpecError {
    let err = parse(text).expect_err("spec should be refused");
    let msg = err.to_string();
    assert_eq!(err.kind, kind, "wrong kind for: {msg}");
    assert_eq!(err.line, line, "wrong line in: {msg}");
    assert!(msg.starts_with(&format!("three.toml:{line}:")), "no place in: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} does not contain {n:?}");
    }
    err
}

const TWO: &str = "name = \"x\"\n[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n";

#[test]
fn example_parses_with_defaults_addresses_and_macs() {
    let e = parse(EXAMPLE).unwrap();
    assert_eq!(e.name, "three-on-a-lan");
    assert_eq!(e.source.as_deref(), Some(Path::new("three.toml")));
    let a = e.node("a").unwrap();
    assert_eq!((a.memory_mib, a.vcpus), (256, 1));
    assert_eq!(a.kernel.as_deref(), Some(Path::new("img/vmlinuz")));
    assert_eq!(a.initrd.as_deref(), Some(Path::new("/abs/initrd.img")));
    assert_eq!(a.run.len(), 2);
    let b = e.node("b").unwrap();
    assert_eq!((b.memory_mib, b.vcpus, b.kernel.as_ref()), (512, 2, None));
    assert_eq!(e.node("c").unwrap().memory_mib, 1024);
    assert_eq!(
        a.ifaces,
        vec![
            Iface {
                name: "eth0".into(),
                network: "lan0".into(),
                mac: "52:54:00:00:00:01".into(),
                ip: "10.0.1.1".into(),
                prefix_len: 24
            },
            Iface {
                name: "eth1".into(),
                network: "l0".into(),
                mac: "52:54:00:00:01:01".into(),
                ip: "10.0.2.1".into(),
                prefix_len: 24
            },
        ]
    );
    assert_eq!(b.ifaces[1].ip, "10.0.2.2");
    assert_eq!(b.ifaces[1].mac, "52:54:00:01:01:01");
    assert_eq!(e.node("c").unwrap().ifaces[0].ip, "10.0.1.3");
    let lan = &e.lans[0];
    assert_eq!(lan.params.bandwidth_bps, 100_000_000);
    assert_eq!(lan.params.delay_ns, 10_000_000);
    assert_eq!(lan.params.queue_packets, 50);
    let l0 = &e.links[0];
    assert_eq!(l0.a_to_b.delay_ns, 5_000_000);
    assert_eq!(l0.b_to_a.delay_ns, 7_000_000);
    assert_eq!(l0.b_to_a.bandwidth_bps, 10_000_000, "override keeps the shared fields");
    assert_eq!(l0.b_to_a.loss, 0.25);
    assert_eq!(l0.a_to_b.loss, 0.0);
}

#[test]
fn relative_paths_resolve_against_the_spec_dir() {
    let text = "name = \"x\"\n[[node]]\nname = \"a\"\nkernel = \"k/vmlinuz\"\n";
    let e = Experiment::from_toml_str(text, Some(Path::new("/exp/specs/x.toml"))).unwrap();
    assert_eq!(e.nodes[0].kernel.as_deref(), Some(Path::new("/exp/specs/k/vmlinuz")));
    let e = Experiment::from_toml_str(text, None).unwrap();
    assert_eq!(e.nodes[0].kernel.as_deref(), Some(Path::new("k/vmlinuz")));
}

#[test]
fn defaults_are_emulab_like() {
    let e = parse(&format!("{TWO}[[link]]\nname = \"l\"\na = \"a\"\nb = \"b\"\n")).unwrap();
    assert_eq!(e.links[0].a_to_b, LinkParams::default());
    assert_eq!(e.links[0].a_to_b.bandwidth_bps, 1_000_000_000);
    assert_eq!(e.nodes[0].memory_mib, DEFAULT_MEMORY_MIB);
}

#[test]
fn queue_bytes_alone_replaces_the_packet_limit() {
    let lan = |extra: &str| {
        let e = parse(&format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\", \"b\"]\n{extra}")).unwrap();
        let p = e.lans[0].params;
        assert_eq!(parse(&e.to_toml()).unwrap(), e, "round trip");
        (p.queue_packets, p.queue_bytes)
    };
    assert_eq!(lan(""), (50, DEFAULT_QUEUE_BYTES));
    assert_eq!(lan("queue_bytes = \"64KB\"\n"), (MAX_QUEUE_PACKETS, 65536));
    assert_eq!(lan("queue = 20\nqueue_bytes = \"64KB\"\n"), (20, 65536));
    assert_eq!(lan("queue = 20\n"), (20, DEFAULT_QUEUE_BYTES));
}

#[test]
fn explicit_ips_override() {
    let e =
        parse(&format!("{TWO}[[link]]\nname = \"l\"\na = \"a\"\nb = \"b\"\nips = [\"10.9.9.1\", \"10.9.9.2/30\"]\n"))
            .unwrap();
    assert_eq!(e.nodes[0].ifaces[0].ip, "10.9.9.1");
    assert_eq!(e.nodes[1].ifaces[0].prefix_len, 30);
    let again = parse(&e.to_toml()).unwrap();
    assert_eq!(again.nodes, e.nodes);
}

#[test]
fn canonical_form_round_trips_and_digest_is_stable() {
    let e = parse(EXAMPLE).unwrap();
    let text = e.to_toml();
    let again = parse(&text).unwrap();
    assert_eq!(again, e, "canonical:\n{text}");
    assert_eq!(again.to_toml(), text);
    assert_eq!(again.digest(), e.digest());
    assert_eq!(e.digest().len(), 64);
    // The same experiment written differently has the same digest.
    let respelled = EXAMPLE.replace("\"100Mb\"", "\"100000Kb\"").replace("\"1G\"", "\"1024M\"");
    assert_eq!(parse(&respelled).unwrap().digest(), e.digest());
    // A different one has another.
    let changed = EXAMPLE.replace("\"10ms\"", "\"11ms\"");
    assert_ne!(parse(&changed).unwrap().digest(), e.digest());
}

#[test]
fn from_file_reads_and_reports_the_path() {
    let dir = std::env::temp_dir().join(format!("stasis-spec-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let path = dir.join("bad.toml");
    std::fs::write(&path, "name = \"x\"\n[[node]]\nname = \"a\"\nvcpus = 0\n").unwrap();
    let err = Experiment::from_file(&path).unwrap_err();
    assert!(err.to_string().starts_with(&format!("{}:4:9:", path.display())), "{err}");
    let err = Experiment::from_file(&dir.join("missing.toml")).unwrap_err();
    assert_eq!(err.kind, SpecErrorKind::Read);
    assert!(std::error::Error::source(&err).is_some());
}

// ---- one test per refusal ----

#[test]
fn refuses_toml_syntax() {
    refused("name = \"x\"\n[[node]\nname = \"a\"\n", SpecErrorKind::Syntax, 2, &[]);
}

#[test]
fn refuses_wrong_value_type_naming_the_field() {
    refused("name = \"x\"\n[[node]]\nname = \"a\"\nvcpus = \"two\"\n", SpecErrorKind::Syntax, 4, &["in field vcpus"]);
}

#[test]
fn refuses_unknown_fields() {
    refused("name = \"x\"\n[[node]]\nname = \"a\"\nmemroy = \"1G\"\n", SpecErrorKind::UnknownField, 4, &["memroy"]);
    refused("name = \"x\"\ncolour = 1\n[[node]]\nname = \"a\"\n", SpecErrorKind::UnknownField, 2, &["colour"]);
    refused(
        &format!("{TWO}[[link]]\nname = \"l\"\na = \"a\"\nb = \"b\"\n[link.a_to_b]\nspeed = \"1Mb\"\n"),
        SpecErrorKind::UnknownField,
        11,
        &["speed"],
    );
}

#[test]
fn refuses_missing_fields() {
    let e = refused("name = \"x\"\n[[node]]\nmemory = \"1G\"\n", SpecErrorKind::MissingField, 2, &["name"]);
    assert_eq!(e.field.as_deref(), Some("name"));
    refused("[[node]]\nname = \"a\"\n", SpecErrorKind::MissingField, 1, &["in field name"]);
}

#[test]
fn refuses_unknown_node_in_link() {
    let text = format!("{TWO}[[link]]\nname = \"l0\"\na = \"a\"\nb = \"z\"\n");
    let e = refused(&text, SpecErrorKind::UnknownNode, 9, &["link \"l0\": unknown node \"z\" in field b"]);
    assert_eq!(e.column, 5);
}

#[test]
fn refuses_unknown_node_in_lan() {
    let text = format!("{TWO}[[lan]]\nname = \"lan0\"\nmembers = [\"a\", \"q\"]\n");
    let e = refused(&text, SpecErrorKind::UnknownNode, 8, &["lan \"lan0\"", "\"q\"", "in field members"]);
    assert_eq!(e.column, 17);
}

#[test]
fn refuses_duplicate_names_across_kinds() {
    refused(
        &format!("{TWO}[[node]]\nname = \"a\"\n"),
        SpecErrorKind::DuplicateName,
        7,
        &["node \"a\"", "already used by a node"],
    );
    refused(
        &format!("{TWO}[[lan]]\nname = \"b\"\nmembers = [\"a\"]\n"),
        SpecErrorKind::DuplicateName,
        7,
        &["lan \"b\"", "in field name"],
    );
    refused(
        &format!("{TWO}[[lan]]\nname = \"n\"\nmembers = [\"a\"]\n[[link]]\nname = \"n\"\na = \"a\"\nb = \"b\"\n"),
        SpecErrorKind::DuplicateName,
        10,
        &["link \"n\"", "lan"],
    );
}

#[test]
fn refuses_bad_names() {
    refused("name = \"Big Exp\"\n[[node]]\nname = \"a\"\n", SpecErrorKind::BadName, 1, &["in field name"]);
    refused("name = \"x\"\n[[node]]\nname = \"1a\"\n", SpecErrorKind::BadName, 3, &["node \"1a\""]);
}

#[test]
fn refuses_impossible_sizes() {
    for (value, needle) in [("\"0\"", "\"0\""), ("\"99T\"", "outside"), ("\"32M\"", "32M"), ("-5", "negative")] {
        refused(
            &format!("name = \"x\"\n[[node]]\nname = \"a\"\nmemory = {value}\n"),
            SpecErrorKind::BadSize,
            4,
            &[needle, "in field memory"],
        );
    }
    refused(
        "name = \"x\"\n[[node]]\nname = \"a\"\nvcpus = 0\n",
        SpecErrorKind::BadSize,
        4,
        &["vcpus 0", "in field vcpus"],
    );
    refused("name = \"x\"\n[[node]]\nname = \"a\"\nvcpus = 65\n", SpecErrorKind::BadSize, 4, &["vcpus"]);
    refused(
        "name = \"x\"\n[defaults]\nvcpus = 0\n[[node]]\nname = \"a\"\n",
        SpecErrorKind::BadSize,
        3,
        &["[defaults]"],
    );
}

#[test]
fn refuses_bad_units() {
    let e = refused(
        &format!("{TWO}[[link]]\nname = \"l0\"\na = \"a\"\nb = \"b\"\nbandwidth = \"10Xb\"\n"),
        SpecErrorKind::BadUnit,
        10,
        &["link \"l0\"", "\"Xb\"", "in field bandwidth"],
    );
    assert_eq!(e.column, 13);
    refused(
        &format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\"]\ndelay = \"5 parsecs\"\n"),
        SpecErrorKind::BadUnit,
        9,
        &["parsecs", "in field delay"],
    );
    refused(
        &format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\"]\ndelay = 5\n"),
        SpecErrorKind::BadUnit,
        9,
        &["in field delay"],
    );
    refused("name = \"x\"\n[[node]]\nname = \"a\"\nmemory = \"4 gallons\"\n", SpecErrorKind::BadUnit, 4, &["gallons"]);
    refused(
        &format!("{TWO}[[link]]\nname = \"l\"\na = \"a\"\nb = \"b\"\n[link.b_to_a]\njitter = \"3 fortnights\"\n"),
        SpecErrorKind::BadUnit,
        11,
        &["in field b_to_a.jitter"],
    );
}

#[test]
fn refuses_loss_outside_probability() {
    refused(
        &format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\"]\nloss = 1.5\n"),
        SpecErrorKind::OutOfRange,
        9,
        &["loss 1.5", "in field loss"],
    );
    refused(
        &format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\"]\nloss = -0.1\n"),
        SpecErrorKind::OutOfRange,
        9,
        &["in field loss"],
    );
}

#[test]
fn refuses_zero_bandwidth_and_empty_queue() {
    refused(
        &format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\"]\nbandwidth = \"0Mb\"\n"),
        SpecErrorKind::OutOfRange,
        9,
        &["in field bandwidth"],
    );
    refused(
        &format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\"]\nqueue = 0\n"),
        SpecErrorKind::OutOfRange,
        9,
        &["in field queue"],
    );
    refused(
        &format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\"]\nqueue_bytes = \"0\"\n"),
        SpecErrorKind::OutOfRange,
        9,
        &["in field queue_bytes"],
    );
}

#[test]
fn refuses_a_node_twice_in_a_lan() {
    refused(
        &format!("{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\", \"b\", \"a\"]\n"),
        SpecErrorKind::DuplicateMember,
        8,
        &["node \"a\" is in the lan twice", "in field members"],
    );
}

#[test]
fn refuses_a_link_to_itself() {
    refused(
        &format!("{TWO}[[link]]\nname = \"l\"\na = \"a\"\nb = \"a\"\n"),
        SpecErrorKind::SelfLink,
        9,
        &["link \"l\"", "itself", "in field b"],
    );
}

#[test]
fn refuses_an_empty_experiment() {
    refused("name = \"x\"\n", SpecErrorKind::Empty, 1, &["no [[node]]"]);
}

#[test]
fn refuses_bad_and_clashing_addresses() {
    refused(
        &format!("{TWO}[[link]]\nname = \"l\"\na = \"a\"\nb = \"b\"\nips = [\"10.0.0.1\", \"banana\"]\n"),
        SpecErrorKind::BadAddress,
        10,
        &["banana", "in field ips"],
    );
    refused(
        &format!("{TWO}[[link]]\nname = \"l\"\na = \"a\"\nb = \"b\"\nips = [\"10.0.0.1\"]\n"),
        SpecErrorKind::BadAddress,
        10,
        &["1 addresses for 2 members"],
    );
    refused(
        &format!(
            "{TWO}[[lan]]\nname = \"l\"\nmembers = [\"a\", \"b\"]\n[[link]]\nname = \"k\"\na = \"a\"\nb = \"b\"\nips = [\"10.0.1.2\", \"10.0.2.2\"]\n"
        ),
        SpecErrorKind::BadAddress,
        13,
        &["10.0.1.2", "already used"],
    );
}

#[test]
fn refuses_line_breaks_in_commands() {
    refused(
        "name = \"x\"\n[[node]]\nname = \"a\"\nrun = [\"echo hi\\nreboot\"]\n",
        SpecErrorKind::OutOfRange,
        4,
        &["in field run"],
    );
}

#[test]
fn too_many_nodes_are_refused() {
    let mut text = String::from("name = \"x\"\n");
    for i in 0..=MAX_NODES {
        text += &format!("[[node]]\nname = \"n{i}\"\n");
    }
    let e = parse(&text).unwrap_err();
    assert_eq!(e.kind, SpecErrorKind::TooMany);
}

#[test]
fn columns_count_characters_not_bytes() {
    let e = parse("name = \"x\" # ünïcödé\n[[node]]\nname = \"a\"\nvcpus = 0\n").unwrap_err();
    assert_eq!((e.line, e.column), (4, 9));
    let src = Source { text: "ab\n€x", file: None };
    assert_eq!(src.line_col(6), (2, 2));
}

// ---- never panics; generated specs round-trip ----

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = Experiment::from_toml_str(&text, None);
    }

    #[test]
    fn mutated_example_never_panics(pos in 0usize..EXAMPLE.len(), len in 0usize..8, insert in "[ -~\\n]{0,6}") {
        let mut bytes = EXAMPLE.as_bytes().to_vec();
        let end = (pos + len).min(bytes.len());
        bytes.splice(pos..end, insert.bytes());
        if let Ok(text) = String::from_utf8(bytes) {
            if let Err(e) = Experiment::from_toml_str(&text, Some(Path::new("m.toml"))) {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("m.toml:"), "{}", msg);
            }
        }
    }

    #[test]
    fn generated_specs_round_trip(
        nodes in 1usize..6,
        mems in proptest::collection::vec(64u32..=16384, 6),
        lans in proptest::collection::vec((proptest::collection::btree_set(0usize..6, 1..4), 1u64..10_000_000_000, 0u64..5_000_000_000, 0u32..=1000), 0..3),
        links in proptest::collection::vec((0usize..6, 0usize..6, 1u64..10_000_000_000, 0u64..100_000_000, 0u64..100_000_000, 0.0f64..=1.0), 0..3),
    ) {
        let mut text = String::from("name = \"gen\"\n");
        for (i, mem) in mems.iter().take(nodes).enumerate() {
            text += &format!("[[node]]\nname = \"n{i}\"\nmemory = {mem}\n");
        }
        for (k, (members, bw, delay, queue)) in lans.iter().enumerate() {
            let members: Vec<String> = members.iter().filter(|&&m| m < nodes).map(|m| format!("\"n{m}\"")).collect();
            if members.is_empty() { continue; }
            text += &format!("[[lan]]\nname = \"lan{k}\"\nmembers = [{}]\nbandwidth = \"{bw}b\"\ndelay = \"{delay}ns\"\nqueue = {}\n", members.join(","), queue.max(&1));
        }
        for (k, (a, b, bw, d1, d2, loss)) in links.iter().enumerate() {
            let (a, b) = (a % nodes, b % nodes);
            if a == b { continue; }
            text += &format!("[[link]]\nname = \"l{k}\"\na = \"n{a}\"\nb = \"n{b}\"\nbandwidth = \"{bw}\"\ndelay = \"{d1}ns\"\nloss = {loss:?}\n[link.b_to_a]\ndelay = \"{d2}ns\"\n");
        }
        let e = Experiment::from_toml_str(&text, None).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let canon = e.to_toml();
        let again = Experiment::from_toml_str(&canon, None).map_err(|e| TestCaseError::fail(format!("{e}\n{canon}")))?;
        prop_assert_eq!(&again, &e);
        prop_assert_eq!(again.digest(), e.digest());
    }
}

#[test]
fn documented_example_parses() {
    let doc = include_str!("../../../../docs/spec.md");
    let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let text = &doc[start..start + doc[start..].find("```").unwrap()];
    let e = parse(text).unwrap_or_else(|e| panic!("docs/spec.md example: {e}"));
    assert_eq!((e.nodes.len(), e.lans.len(), e.links.len()), (3, 1, 1));
    assert_eq!(e.links[0].b_to_a.delay_ns, 7_000_000);
    assert_eq!(e.links[0].a_to_b.delay_ns, 5_000_000);
}

#[test]
fn nic_mode_defaults_to_vhost_user_and_nodes_override_it() {
    let e = parse(TWO).unwrap();
    assert!(e.nodes.iter().all(|n| n.nic == NicMode::VhostUser));
    let text = "name = \"x\"\nnic = \"stream\"\n[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\nnic = \"vhost-user\"\n";
    let e = parse(text).unwrap();
    assert_eq!(e.nodes[0].nic, NicMode::Stream);
    assert_eq!(e.nodes[1].nic, NicMode::VhostUser);
    let canon = e.to_toml();
    assert_eq!(canon.matches("nic = \"stream\"").count(), 1, "{canon}");
    assert_eq!(parse(&canon).unwrap(), e, "round trip:\n{canon}");
    assert_ne!(e.digest(), parse(TWO).unwrap().digest());
    // The default is not spelled out in the canonical form.
    assert!(!parse(TWO).unwrap().to_toml().contains("nic"));
}

#[test]
fn refuses_unknown_nic_modes_with_their_place() {
    refused(
        "name = \"x\"\nnic = \"tap\"\n[[node]]\nname = \"a\"\n",
        SpecErrorKind::OutOfRange,
        2,
        &["\"tap\"", "vhost-user", "nic"],
    );
    refused(
        "name = \"x\"\n[[node]]\nname = \"a\"\nnic = \"vhost\"\n",
        SpecErrorKind::OutOfRange,
        4,
        &["node \"a\"", "\"vhost\""],
    );
    refused("name = \"x\"\n[[node]]\nname = \"a\"\nnic = 3\n", SpecErrorKind::Syntax, 4, &["nic"]);
}

#[test]
fn disk_is_optional_round_trips_and_is_checked() {
    let e = parse("name = \"d\"\n[[node]]\nname = \"a\"\ndisk = \"1G\"\n[[node]]\nname = \"b\"\n").unwrap();
    assert_eq!(e.nodes[0].disk_bytes, Some(1 << 30));
    assert_eq!(e.nodes[1].disk_bytes, None);
    let canon = e.to_toml();
    assert!(canon.contains("disk = \"1G\""), "{canon}");
    assert_eq!(canon.matches("disk =").count(), 1, "no disk line for a node without one: {canon}");
    assert_eq!(parse(&canon).unwrap().nodes, e.nodes);
    // A spec without disks keeps its canonical form (and digest).
    let plain = parse("name = \"d\"\n[[node]]\nname = \"b\"\n").unwrap();
    assert!(!plain.to_toml().contains("disk"));
    refused("name = \"d\"\n[[node]]\nname = \"a\"\ndisk = \"12Q\"\n", SpecErrorKind::BadUnit, 4, &["disk"]);
    refused("name = \"d\"\n[[node]]\nname = \"a\"\ndisk = \"4K\"\n", SpecErrorKind::BadUnit, 4, &["at least 1M"]);
}

// ---- multi-host placement ------------------------------------------------

const HOSTS: &str = r#"name = "spread"
nic = "stream"

[[host]]
name = "h1"
agent = "10.77.0.1:7700"

[[host]]
name = "h2"
agent = "10.77.0.2:7700"

[delay]
host = "h2"

[[node]]
name = "a"
host = "h1"

[[node]]
name = "b"
host = "h2"
nic = "vhost-user"

[[node]]
name = "c"

[[lan]]
name = "lan0"
members = ["a", "b", "c"]
"#;

#[test]
fn hosts_place_nodes_and_the_delay_node() {
    let e = parse(HOSTS).unwrap();
    let p = e.placement.as_ref().expect("placement");
    assert_eq!(p.hosts.len(), 2);
    assert_eq!(p.host("h2").unwrap().agent, "10.77.0.2:7700".parse().unwrap());
    assert_eq!(p.delay_host, "h2");
    assert_eq!(p.delay_port_base, DEFAULT_DELAY_PORT_BASE);
    let hosts: Vec<_> = e.nodes.iter().map(|n| n.host.as_deref().unwrap()).collect();
    assert_eq!(hosts, ["h1", "h2", "h1"], "a node without host goes to the first host");
    // The canonical form keeps the placement, and changes the digest.
    let again = parse(&e.to_toml()).unwrap();
    assert_eq!(again.placement, e.placement);
    assert_eq!(again.nodes, e.nodes);
    let single = parse(EXAMPLE).unwrap();
    assert!(single.placement.is_none() && single.nodes.iter().all(|n| n.host.is_none()));
    assert!(!single.to_toml().contains("[[host]]"));
}

#[test]
fn placement_mistakes_are_refused_with_their_place() {
    let unknown = HOSTS.replace("host = \"h2\"\nnic", "host = \"h9\"\nnic");
    refused(&unknown, SpecErrorKind::UnknownNode, 21, &["node \"b\"", "unknown host \"h9\"", "h1, h2", "field host"]);
    let vhost_remote = HOSTS.replace("[delay]\nhost = \"h2\"", "[delay]\nhost = \"h1\"");
    refused(
        &vhost_remote,
        SpecErrorKind::OutOfRange,
        22,
        &["node \"b\"", "vhost-user", "nic = \"stream\"", "field nic"],
    );
    let bad_addr = HOSTS.replace("10.77.0.2:7700", "10.77.0.2");
    refused(&bad_addr, SpecErrorKind::BadAddress, 10, &["host \"h2\"", "not an IP:port", "field agent"]);
    let wildcard = HOSTS.replace("10.77.0.2:7700", "0.0.0.0:7700");
    refused(&wildcard, SpecErrorKind::BadAddress, 10, &["concrete IP"]);
    let same = HOSTS.replace("10.77.0.2:7700", "10.77.0.1:7700");
    refused(&same, SpecErrorKind::BadAddress, 10, &["host \"h1\" has the same agent address"]);
    let dup = HOSTS.replace("name = \"h2\"", "name = \"h1\"");
    refused(&dup, SpecErrorKind::DuplicateName, 9, &["host \"h1\""]);
    let bad_delay = HOSTS.replace("[delay]\nhost = \"h2\"", "[delay]\nhost = \"hx\"");
    refused(&bad_delay, SpecErrorKind::UnknownNode, 13, &["[delay]", "unknown host \"hx\""]);
    let port = HOSTS.replace("[delay]\nhost = \"h2\"", "[delay]\nhost = \"h2\"\nport_base = 70000");
    refused(&port, SpecErrorKind::OutOfRange, 14, &["port_base 70000"]);
    let disk = HOSTS.replace("name = \"c\"", "name = \"c\"\ndisk = \"1G\"");
    refused(&disk, SpecErrorKind::Unsupported, 26, &["node \"c\"", "not supported", "field disk"]);
    let typo = HOSTS.replace("agent = \"10.77.0.1:7700\"", "agnet = \"10.77.0.1:7700\"");
    refused(&typo, SpecErrorKind::UnknownField, 6, &["agnet"]);
}

#[test]
fn host_fields_without_hosts_are_refused() {
    let text = EXAMPLE.replace("name = \"b\"\n", "name = \"b\"\nhost = \"h1\"\n");
    refused(&text, SpecErrorKind::UnknownField, 17, &["no [[host]]", "field host"]);
    let text = format!("{EXAMPLE}\n[delay]\nhost = \"h1\"\n");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.kind, SpecErrorKind::UnknownField);
    assert!(err.to_string().contains("[delay] needs [[host]]"), "{err}");
}

#[test]
fn checkpoint_policy_parses_round_trips_and_is_described() {
    let text = "name = \"p\"\n[[node]]\nname = \"a\"\n[checkpoint]\nevery = \"5m\"\nkeep = 3\nkeep_daily = 7\n";
    let e = parse(text).unwrap();
    assert_eq!(e.checkpoint, Some(CheckpointPolicy { every_s: 300, keep: 3, keep_daily: 7 }));
    let canon = e.to_toml();
    assert!(canon.contains("[checkpoint]\nevery = \"5m\"\nkeep = 3\nkeep_daily = 7\n"), "{canon}");
    let again = Experiment::from_toml_str(&canon, None).unwrap();
    assert_eq!(again.checkpoint, e.checkpoint);
    let without = parse("name = \"p\"\n[[node]]\nname = \"a\"\n").unwrap();
    assert_eq!(without.checkpoint, None);
    assert_ne!(without.digest(), e.digest(), "the policy is part of the digest");
    let text = e.describe().to_string();
    assert!(text.contains("periodic checkpoints (stasis supervise): every 5m, keep the newest 3"), "{text}");
    let defaults = parse("name = \"p\"\n[[node]]\nname = \"a\"\n[checkpoint]\nevery = \"10s\"\n").unwrap();
    assert_eq!(defaults.checkpoint, Some(CheckpointPolicy { every_s: 10, keep: 10, keep_daily: 0 }));
}

#[test]
fn checkpoint_policy_mistakes_are_refused_with_their_place() {
    let head = "name = \"p\"\n[[node]]\nname = \"a\"\n[checkpoint]\n";
    refused(&format!("{head}every = \"5\"\n"), SpecErrorKind::BadUnit, 5, &["[checkpoint]", "needs a unit", "every"]);
    refused(&format!("{head}every = \"5 fortnights\"\n"), SpecErrorKind::BadUnit, 5, &["unknown unit"]);
    refused(&format!("{head}every = \"0s\"\n"), SpecErrorKind::OutOfRange, 5, &["from 1s"]);
    refused(&format!("{head}every = \"1m\"\nkeep = 0\n"), SpecErrorKind::OutOfRange, 6, &["keep = 0", "keep"]);
    refused(&format!("{head}every = \"1m\"\nkeep_daily = -1\n"), SpecErrorKind::OutOfRange, 6, &["keep_daily"]);
    refused(&format!("{head}keep = 2\n"), SpecErrorKind::MissingField, 4, &["`every` is needed"]);
    refused(&format!("{head}every = \"1m\"\nkeep_hourly = 2\n"), SpecErrorKind::UnknownField, 6, &["keep_hourly"]);
}
