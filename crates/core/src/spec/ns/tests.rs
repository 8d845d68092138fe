use super::super::{Experiment, ImageCatalog, SpecErrorKind};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

const SCRIPT: &str = r#"# Three nodes on a LAN and a shaped link.
set ns [new Simulator]
source tb_compat.tcl

set nodeA [$ns node]
set nodeB [$ns node]
set node_c [$ns node]
tb-set-node-os $nodeA UBUNTU22-64-STD
tb-set-node-startcmd $nodeA "stasis-probe --node a"

set lan0 [$ns make-lan "$nodeA $nodeB $node_c" 100Mb 10ms]
tb-set-lan-loss $lan0 0.01
set link0 [$ns duplex-link $nodeA $nodeB 10Mb 5ms DropTail]
tb-set-link-simplex-params $link0 $nodeB 7ms 10Mb 0.25
tb-set-ip-link $nodeA $link0 10.9.9.1
tb-set-ip-link $nodeB $link0 10.9.9.2

$ns rtproto Static
$ns run
"#;

const SAME_IN_TOML: &str = r#"name = "three"
[images]
UBUNTU22-64-STD = "/images/ubuntu22.qcow2"
[[node]]
name = "nodea"
os = "UBUNTU22-64-STD"
run = ["stasis-probe --node a"]
[[node]]
name = "nodeb"
[[node]]
name = "node-c"
[[lan]]
name = "lan0"
members = ["nodea", "nodeb", "node-c"]
bandwidth = "100Mb"
delay = "10ms"
loss = 0.01
[[link]]
name = "link0"
a = "nodea"
b = "nodeb"
ips = ["10.9.9.1", "10.9.9.2"]
bandwidth = "10Mb"
delay = "5ms"
[link.b_to_a]
delay = "7ms"
loss = 0.25
"#;

fn ubuntu() -> ImageCatalog {
    let mut c = ImageCatalog::default();
    c.overrides.insert("UBUNTU22-64-STD".into(), PathBuf::from("/images/ubuntu22.qcow2"));
    c
}

fn ns(text: &str) -> Result<Experiment, super::SpecError> {
    Experiment::from_ns_script_with(text, Some(Path::new("dir/three.ns")), &ubuntu())
}

#[test]
fn script_imports_as_the_equivalent_toml() {
    let from_ns = ns(SCRIPT).unwrap();
    let from_toml = Experiment::from_toml_str(SAME_IN_TOML, None).unwrap();
    assert_eq!(from_ns.name, "three");
    assert_eq!(from_ns.nodes, from_toml.nodes);
    assert_eq!(from_ns.lans, from_toml.lans);
    assert_eq!(from_ns.links, from_toml.links);
    assert_eq!(from_ns.to_toml(), from_toml.to_toml());
    assert_eq!(from_ns.nodes[0].image.as_deref(), Some(Path::new("/images/ubuntu22.qcow2")));
    assert_eq!(
        Experiment::from_ns_script("set ns [new Simulator]\nset a [$ns node]\n", None).unwrap().name,
        "ns-import"
    );
}

/// Loops, arrays, `append`, variables and `expr`: what Emulab's users write.
const LOOPS: &str = r#"set ns [new Simulator]
source tb_compat.tcl
set bw 100Mb
set count 3
for {set i 0} {$i < $count} {incr i} {
    set n($i) [$ns node]
    tb-set-node-os $n($i) STASIS
}
set members ""
foreach i {0 1 2} {
    append members "$n($i) "
}
proc delay_ms {hops} { return [expr {$hops * 5}]ms }
set lan0 [$ns make-lan $members $bw [delay_ms 2]]
set link0 [$ns duplex-link $n(0) $n(2) [expr {$count * 10}]Mb [expr 3 + 4]ms DropTail]
$ns run
"#;

const STRAIGHT: &str = r#"set ns [new Simulator]
source tb_compat.tcl
set n(0) [$ns node]
tb-set-node-os $n(0) STASIS
set n(1) [$ns node]
tb-set-node-os $n(1) STASIS
set n(2) [$ns node]
tb-set-node-os $n(2) STASIS
set lan0 [$ns make-lan "$n(0) $n(1) $n(2)" 100Mb 10ms]
set link0 [$ns duplex-link $n(0) $n(2) 30Mb 7ms DropTail]
$ns run
"#;

#[test]
fn loops_and_variables_import_as_the_straight_line_script() {
    let looped = Experiment::from_ns_script(LOOPS, Some(Path::new("x/loops.ns"))).unwrap();
    let straight = Experiment::from_ns_script(STRAIGHT, Some(Path::new("y/loops.ns"))).unwrap();
    assert_eq!(looped.digest(), straight.digest(), "{}\n---\n{}", looped.to_toml(), straight.to_toml());
    let names: Vec<&str> = looped.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["n-0", "n-1", "n-2"], "ARRAY(INDEX) names ARRAY-INDEX, as in Emulab");
    assert_eq!(looped.lans[0].params.delay_ns, 10_000_000);
    assert_eq!(looped.lans[0].params.bandwidth_bps, 100_000_000);
    assert_eq!(looped.links[0].a_to_b.bandwidth_bps, 30_000_000);
    assert_eq!(looped.links[0].a_to_b.delay_ns, 7_000_000);
    assert!(looped.nodes.iter().all(|n| n.os.as_deref() == Some("STASIS") && n.image.is_none()));
}

fn refused_with(
    text: &str,
    catalog: &ImageCatalog,
    kind: SpecErrorKind,
    line: usize,
    needles: &[&str],
) -> super::SpecError {
    let e = Experiment::from_ns_script_with(text, Some(Path::new("dir/three.ns")), catalog).expect_err("refused");
    let msg = e.to_string();
    assert_eq!(e.kind, kind, "{msg}");
    assert!(msg.starts_with(&format!("dir/three.ns:{line}:")), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
    e
}

fn refused(text: &str, kind: SpecErrorKind, line: usize, needles: &[&str]) -> super::SpecError {
    refused_with(text, &ubuntu(), kind, line, needles)
}

const HEAD: &str = "set ns [new Simulator]\nset a [$ns node]\nset b [$ns node]\n";

#[test]
fn refusals_point_into_the_script() {
    use SpecErrorKind::*;
    refused(&format!("{HEAD}tb-set-magic $a 1\n"), Unsupported, 4, &["`tb-set-magic`"]);
    refused(&format!("{HEAD}frobnicate $a\n"), Unsupported, 4, &["unsupported NS command `frobnicate`"]);
    let e =
        refused(&format!("{HEAD}set l [$ns duplex-link $a $z 10Mb 5ms DropTail]\n"), Script, 4, &["can't read \"z\""]);
    assert_eq!(e.column, "set l [$ns duplex-link $a ".len() + 1, "placed on $z");
    refused(
        &format!("{HEAD}set l [$ns duplex-link $a $b 10Xb 5ms DropTail]\n"),
        BadUnit,
        4,
        &["Xb", "in field bandwidth"],
    );
    refused(&format!("{HEAD}set l [$ns duplex-link $a $b 10Mb 5ms RED]\n"), Unsupported, 4, &["RED"]);
    refused(&format!("{HEAD}set l [$ns make-lan \"$a $b $a\" 10Mb 0ms]\n"), DuplicateMember, 4, &["twice"]);
    refused(&format!("{HEAD}set l [$ns node\n"), Script, 4, &["missing close-bracket"]);
    refused(
        &format!("{HEAD}set l [$ns duplex-link $a $b 10Mb 5ms]\ntb-set-link-loss $l 2\n"),
        OutOfRange,
        5,
        &["in field loss"],
    );
    refused(
        &format!("{HEAD}set l [$ns duplex-link $a $b 10Mb 5ms]\ntb-set-ip-link $a $l 10.1.1.1\n"),
        BadAddress,
        4,
        &["\"b\""],
    );
    refused(&format!("{HEAD}tb-set-link-loss $a 0.1\n"), UnknownNode, 4, &["not a lan or link"]);
    refused(
        &format!("{HEAD}set l [$ns duplex-link $a nobody 10Mb 5ms]\n"),
        UnknownNode,
        4,
        &["`nobody` is not a node"],
    );
    refused(&format!("{HEAD}$ns at 1.0 \"$a start\"\n"), Unsupported, 4, &["simulator command `at`"]);
    refused(&format!("{HEAD}$a add-desire x\n"), Unsupported, 4, &["method `add-desire`"]);
    refused(&format!("{HEAD}set p [new Program $ns]\n"), Unsupported, 4, &["object `Program`"]);
    refused("set ns [new Simulator]\n", Empty, 1, &[]);
}

#[test]
fn the_script_cannot_escape_or_run_forever() {
    use SpecErrorKind::*;
    // A refused command stays refused even when the script catches the error.
    refused(&format!("{HEAD}catch {{tb-set-magic $a}}\ncatch {{frobnicate}}\n"), Unsupported, 4, &["tb-set-magic"]);
    refused(&format!("{HEAD}\ncatch {{frobnicate}}\n"), Unsupported, 5, &["frobnicate"]);
    // No files, no processes: the safe interpreter has neither.
    refused(&format!("{HEAD}source /etc/passwd\n"), Unsupported, 4, &["one self-contained file"]);
    refused(&format!("{HEAD}set f [open /etc/passwd]\n"), Unsupported, 4, &["`open`"]);
    refused(&format!("{HEAD}exec touch /tmp/stasis-ns-escaped\n"), Unsupported, 4, &["`exec`"]);
    assert!(!Path::new("/tmp/stasis-ns-escaped").exists());
    // Output has nowhere to go, and is no error.
    ns(&format!("{HEAD}puts \"hello\"\nputs stderr x\n")).unwrap();
    // An endless loop is stopped by the interpreter's limits.
    let t0 = std::time::Instant::now();
    refused(&format!("{HEAD}while 1 {{}}\n"), Script, 4, &["stopped", "limit exceeded"]);
    assert!(t0.elapsed() < std::time::Duration::from_secs(25), "{:?}", t0.elapsed());
}

#[test]
fn objects_are_named_after_their_first_variable() {
    // A node stored nowhere has no name: refused where it was made.
    let e =
        refused(&format!("{HEAD}lappend extra [$ns node]\n"), SpecErrorKind::Syntax, 4, &["not stored in a variable"]);
    assert_eq!(e.column, 1);
    // A later copy and a loop variable do not rename it.
    let e = ns(&format!("{HEAD}set c $a\nforeach x [list $a $b] {{ tb-set-node-startcmd $x \"true\" }}\n")).unwrap();
    let names: Vec<&str> = e.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(e.nodes[1].run, ["true"]);
    // A node made inside a proc is named after the proc's variable.
    let e =
        ns("set ns [new Simulator]\nproc mk {} { global ns; set inner [$ns node]; return $inner }\nset outer [mk]\n")
            .unwrap();
    assert_eq!(e.nodes[0].name, "inner");
}

#[test]
fn commands_inside_procs_and_loops_are_placed_on_their_own_line() {
    let text = format!("{HEAD}proc bad {{}} {{\n    global a\n    tb-set-node-os $a\n}}\nbad\n");
    let e = refused(&text, SpecErrorKind::Syntax, 6, &["usage: tb-set-node-os"]);
    assert_eq!(e.column, 5);
    let text = format!("{HEAD}for {{set i 0}} {{$i < 2}} {{incr i}} {{\n  if {{$i == 1}} {{\n    set l [$ns duplex-link $a $b 1Qb 0ms]\n  }}\n}}\n");
    let e = refused(&text, SpecErrorKind::BadUnit, 6, &["1Qb"]);
    assert_eq!(e.column, "    set l [$ns duplex-link $a $b ".len() + 1);
}

#[test]
fn node_os_selects_an_image() {
    use SpecErrorKind::*;
    let script = format!("{HEAD}tb-set-node-os $a UBUNTU22-64-STD\ntb-set-node-os $b FBSD-STD\n");
    // Unmapped and no default image: refused on the OS name.
    let e = refused(&script, Image, 5, &["no image for OS \"FBSD-STD\"", "--image FBSD-STD=PATH"]);
    assert_eq!(e.column, "tb-set-node-os $b ".len() + 1);
    // With a default image: used, with a warning naming the OS and the image.
    let mut cat = ubuntu();
    cat.default = Some(PathBuf::from("/images/default.qcow2"));
    let e = Experiment::from_ns_script_with(&script, None, &cat).unwrap();
    assert_eq!(e.nodes[0].image.as_deref(), Some(Path::new("/images/ubuntu22.qcow2")));
    assert_eq!(e.nodes[1].image.as_deref(), Some(Path::new("/images/default.qcow2")));
    assert_eq!(e.warnings.len(), 1, "{:?}", e.warnings);
    // The caller's default is only for OS names: a node asking for none
    // stays the busybox guest.
    let plain = Experiment::from_ns_script_with(HEAD, None, &cat).unwrap();
    assert!(plain.nodes.iter().all(|n| n.image.is_none()), "{:?}", plain.nodes);
    assert!(e.warnings[0].contains("FBSD-STD") && e.warnings[0].contains("/images/default.qcow2"), "{:?}", e.warnings);
    // The project's own guest by name (the GEC8 demo's script).
    let e = ns(&format!("{HEAD}tb-set-node-os $a STASIS\n")).unwrap();
    assert_eq!((e.nodes[0].os.as_deref(), e.nodes[0].image.as_deref()), (Some("STASIS"), None));
}

/// The demo's script (issue 7), exactly as given there.
const GEC8: &str = include_str!("../../../../../examples/gec8.ns");

#[test]
fn gec8_script_imports_as_is() {
    let e = Experiment::from_ns_script(GEC8, Some(Path::new("examples/gec8.ns"))).unwrap();
    assert_eq!(e.name, "gec8");
    let names: Vec<&str> = e.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["nodea", "nodeb", "nodec", "noded"]);
    assert_eq!(e.lans.len(), 1);
    assert_eq!(e.lans[0].members, names);
    assert_eq!(e.lans[0].params.bandwidth_bps, 1_000_000_000);
    assert_eq!(e.lans[0].params.delay_ns, 0);
    assert_eq!(e.nodes[0].ifaces[0].ip, "10.0.1.1");
    assert!(e.nodes.iter().all(|n| n.run.is_empty() && n.image.is_none()));
}

/// `GEC8` with `from` replaced by `to` on line `line` (1-based) must be
/// refused as `kind` at that line and at the column where `at` starts.
fn gec8_refused(line: usize, from: &str, to: &str, at: &str, kind: SpecErrorKind, needle: &str) {
    let mut lines: Vec<String> = GEC8.lines().map(str::to_owned).collect();
    assert!(lines[line - 1].contains(from), "{from:?} not on line {line}");
    lines[line - 1] = lines[line - 1].replace(from, to);
    let column = lines[line - 1].find(at).expect("`at` on the line") + 1;
    let e = Experiment::from_ns_script(&lines.join("\n"), Some(Path::new("gec8.ns"))).expect_err("refused");
    let msg = e.to_string();
    assert_eq!((e.kind, e.line, e.column), (kind, line, column), "{msg}");
    assert!(msg.starts_with(&format!("gec8.ns:{line}:{column}: ")), "{msg}");
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

#[test]
fn gec8_mistakes_are_placed_by_line_and_column() {
    use SpecErrorKind::*;
    // Unknown commands, top-level and simulator.
    gec8_refused(
        10,
        "tb-set-node-os $nodeC STASIS",
        "tb-set-node-colour $nodeC red",
        "tb-set-node-colour",
        Unsupported,
        "`tb-set-node-colour`",
    );
    gec8_refused(12, "$ns run", "$ns runn", "runn", Unsupported, "`runn`");
    // Undefined variables: Tcl stops there, and the error is placed on them.
    gec8_refused(7, "$nodeD\"", "$nodeE\"", "$nodeE", Script, "can't read \"nodeE\"");
    gec8_refused(11, "$nodeD STASIS", "$nodeX STASIS", "$nodeX", Script, "can't read \"nodeX\"");
    // A value that is not a node.
    gec8_refused(11, "$nodeD STASIS", "$lan0 STASIS", "$lan0", UnknownNode, "is not a node");
    // Bad bandwidth unit, and a bad delay unit.
    gec8_refused(7, "1000Mb", "1000Xb", "1000Xb", BadUnit, "in field bandwidth");
    gec8_refused(7, " 0ms]", " 0mz]", "0mz", BadUnit, "in field delay");
}

#[test]
fn documented_script_imports() {
    let doc = include_str!("../../../../../docs/spec.md");
    let start = doc.find("```tcl\n").expect("a tcl block") + "```tcl\n".len();
    let text = &doc[start..start + doc[start..].find("```").unwrap()];
    let e = Experiment::from_ns_script(text, None).unwrap_or_else(|e| panic!("docs/spec.md: {e}"));
    assert_eq!((e.nodes.len(), e.lans.len(), e.links.len()), (2, 1, 1));
    assert_eq!(e.links[0].b_to_a.loss, 0.25);
    assert_eq!(e.links[0].a_to_b.loss, 0.01);
    assert_eq!(e.node("nodea").unwrap().run, ["stasis-probe --node a"]);
}

#[test]
fn words_of_a_command_are_found() {
    let w: Vec<&str> = {
        let t = "$ns duplex-link $n(0) \"a b\" {x {y}} [expr {1+2}]ms ab\\ c";
        super::words(t).into_iter().map(|w| &t[w.span]).collect()
    };
    assert_eq!(w, ["$ns", "duplex-link", "$n(0)", "\"a b\"", "{x {y}}", "[expr {1+2}]ms", "ab\\ c"]);
}

proptest! {
    // Every case starts a Tcl interpreter (~10 ms): fewer cases than usual.
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn arbitrary_scripts_never_panic(text in "\\PC{0,300}") {
        let _ = Experiment::from_ns_script(&text, None);
    }

    #[test]
    fn mutated_script_never_panics(pos in 0usize..SCRIPT.len(), len in 0usize..6, insert in "[ -~\\n]{0,5}") {
        let mut bytes = SCRIPT.as_bytes().to_vec();
        let end = (pos + len).min(bytes.len());
        bytes.splice(pos..end, insert.bytes());
        if let Ok(text) = String::from_utf8(bytes) {
            let _ = Experiment::from_ns_script_with(&text, Some(Path::new("m.ns")), &ubuntu());
        }
    }

    #[test]
    fn words_never_panic(text in "\\PC{0,200}") {
        for w in super::words(&text) {
            prop_assert!(w.span.start <= w.span.end && w.span.end <= text.len());
        }
    }
}
