//! Importer for the subset of Emulab NS scripts that describes a topology:
//! `$ns node`, `$ns duplex-link`, `$ns make-lan`, and the `tb-set-*`
//! commands for loss, addresses, per-direction parameters and start
//! commands. The script becomes the same raw spec a TOML file would, with
//! spans into the script, so it is checked by the same rules and errors
//! point into the `.ns` file.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;

use super::{RawLan, RawLink, RawNode, RawParams, RawSpec, Source, SpecError, SpecErrorKind};

type Ips = Option<Spanned<Vec<Spanned<String>>>>;

/// One Tcl word and where it is.
#[derive(Debug, Clone)]
struct Word {
    text: String,
    span: Range<usize>,
    /// `[...]`: a command substitution (text is the inside).
    bracket: bool,
}

/// Splits the script into commands of words. Understands `#` comments,
/// `;` and newlines as separators, `\` line continuations, "quoted" and
/// {braced} words and nested [brackets].
fn commands(text: &str, src: &Source) -> Result<Vec<Vec<Word>>, SpecError> {
    let bytes = text.as_bytes();
    let mut cmds = Vec::new();
    let mut cmd: Vec<Word> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' | b';' => {
                if !cmd.is_empty() {
                    cmds.push(std::mem::take(&mut cmd));
                }
                i += 1;
            }
            b'\\' if bytes.get(i + 1) == Some(&b'\n') => i += 2,
            b' ' | b'\t' | b'\r' => i += 1,
            b'#' if cmd.is_empty() => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' | b'{' | b'[' => {
                let (open, close) = match c {
                    b'"' => (b'"', b'"'),
                    b'{' => (b'{', b'}'),
                    _ => (b'[', b']'),
                };
                let start = i;
                let mut depth = 1;
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == b'\\' && c == b'"' {
                        i += 2;
                        continue;
                    }
                    if bytes[i] == close && (open != close || depth == 1) {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    } else if bytes[i] == open && open != close {
                        depth += 1;
                    }
                    i += 1;
                }
                if i >= bytes.len() {
                    return Err(src.error(
                        SpecErrorKind::Syntax,
                        start..start + 1,
                        None,
                        None,
                        format!("unclosed `{}`", c as char),
                    ));
                }
                let raw = &text[start + 1..i];
                // Only quoted words unescape; brackets keep their text so
                // spans inside them stay exact.
                let inner = if c == b'"' {
                    raw.replace("\\\"", "\"")
                } else {
                    raw.to_owned()
                };
                cmd.push(Word {
                    text: inner,
                    span: start..i + 1,
                    bracket: c == b'[',
                });
                i += 1;
            }
            _ => {
                let start = i;
                while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t' | b'\r' | b'\n' | b';') {
                    i += 1;
                }
                cmd.push(Word {
                    text: text[start..i].to_owned(),
                    span: start..i,
                    bracket: false,
                });
            }
        }
    }
    if !cmd.is_empty() {
        cmds.push(cmd);
    }
    Ok(cmds)
}

/// The words of a `[...]` substitution, with spans in the whole script.
fn inner_words(w: &Word, src: &Source) -> Result<Vec<Word>, SpecError> {
    let offset = w.span.start + 1;
    let mut cmds = commands(
        &w.text,
        &Source {
            text: &w.text,
            file: None,
        },
    )
    .map_err(|mut e| {
        // Re-place the error in the whole script.
        let (line, column) = src.line_col(offset);
        e.file = src.file.clone();
        (e.line, e.column) = (line, column);
        e
    })?;
    let mut words = cmds.pop().unwrap_or_default();
    if !cmds.is_empty() {
        return Err(src.error(
            SpecErrorKind::Syntax,
            w.span.clone(),
            None,
            None,
            "one command per [...]",
        ));
    }
    for word in &mut words {
        word.span = word.span.start + offset..word.span.end + offset;
    }
    Ok(words)
}

/// Emulab names are hostnames: case-insensitive, `-` for `_`.
fn node_name(var: &str) -> String {
    var.to_ascii_lowercase().replace('_', "-")
}

fn value(w: &Word) -> Option<Spanned<toml::Value>> {
    Some(Spanned::new(
        w.span.clone(),
        toml::Value::String(w.text.clone()),
    ))
}

fn number(w: &Word) -> Option<Spanned<toml::Value>> {
    let v = match w.text.parse::<f64>() {
        Ok(x) => toml::Value::Float(x),
        Err(_) => toml::Value::String(w.text.clone()),
    };
    Some(Spanned::new(w.span.clone(), v))
}

enum Net {
    Lan(Box<RawLan>),
    Link(Box<RawLink>),
}

/// What a script variable names.
enum Var {
    Simulator,
    Node(usize),
    Net(usize),
}

/// Testbed settings of one node (`tb-set-node-os $node OS`): nothing to
/// emulate, but the node must exist.
const IGNORED_PER_NODE: &[&str] = &["tb-set-node-os", "tb-set-hardware", "tb-set-node-failure-action"];

const IGNORED: &[&str] = &[
    "source",
    "tb-use-endnodeshaping",
    "tb-set-sync-server",
    "tb-set-colocate-factor",
    "tb-set-noshaping",
    "tb-set-endnodeshaping",
];

/// Parses an NS script into the raw spec.
pub(super) fn parse(text: &str, src: &Source, name: String) -> Result<RawSpec, SpecError> {
    use SpecErrorKind::*;
    let mut vars: BTreeMap<String, Var> = BTreeMap::new();
    let mut nodes: Vec<RawNode> = Vec::new();
    let mut nets: Vec<Net> = Vec::new();
    // (network index, node name) → address word, from tb-set-ip-link/lan.
    let mut ips: BTreeMap<(usize, String), Word> = BTreeMap::new();

    let unsupported = |w: &Word, what: &str| {
        src.error(
            Unsupported,
            w.span.clone(),
            None,
            None,
            format!("unsupported NS {what} `{}`", w.text),
        )
    };
    let arity = |cmd: &[Word], n: usize, usage: &str| -> Result<(), SpecError> {
        if cmd.len() == n {
            Ok(())
        } else {
            Err(src.error(
                Syntax,
                cmd[0].span.clone(),
                None,
                None,
                format!("usage: {usage}"),
            ))
        }
    };

    for cmd in commands(text, src)? {
        let head = &cmd[0];
        match head.text.as_str() {
            "set" => {
                arity(&cmd, 3, "set <var> [<command>]")?;
                let var = cmd[1].text.clone();
                let rhs = &cmd[2];
                if !rhs.bracket {
                    return Err(unsupported(rhs, "value (expected a [command])"));
                }
                let w = inner_words(rhs, src)?;
                let Some(first) = w.first() else {
                    return Err(src.error(Syntax, rhs.span.clone(), None, None, "empty [ ]"));
                };
                if first.text == "new" && w.get(1).is_some_and(|s| s.text == "Simulator") {
                    vars.insert(var, Var::Simulator);
                    continue;
                }
                let is_sim =
                    var_of(first).is_some_and(|v| matches!(vars.get(v), Some(Var::Simulator)));
                if !is_sim || w.len() < 2 {
                    return Err(unsupported(first, "command"));
                }
                match w[1].text.as_str() {
                    "node" => {
                        arity(&w, 2, "[$ns node]")?;
                        vars.insert(var.clone(), Var::Node(nodes.len()));
                        nodes.push(RawNode {
                            name: Spanned::new(cmd[1].span.clone(), node_name(&var)),
                            memory: None,
                            vcpus: None,
                            kernel: None,
                            initrd: None,
                            kernel_args: None,
                            nic: None,
                            disk: None,
                            run: Vec::new(),
                            host: None,
                        });
                    }
                    "duplex-link" => {
                        if !(w.len() == 6 || w.len() == 7) {
                            return Err(src.error(
                                Syntax,
                                rhs.span.clone(),
                                None,
                                None,
                                "usage: [$ns duplex-link $a $b <bandwidth> <delay> [DropTail]]",
                            ));
                        }
                        if let Some(q) = w.get(6).filter(|q| q.text != "DropTail") {
                            return Err(unsupported(q, "queue discipline (only DropTail)"));
                        }
                        let end = |w: &Word| {
                            Spanned::new(w.span.clone(), node_name(var_of(w).unwrap_or(&w.text)))
                        };
                        vars.insert(var.clone(), Var::Net(nets.len()));
                        nets.push(Net::Link(Box::new(RawLink {
                            name: Spanned::new(cmd[1].span.clone(), node_name(&var)),
                            a: end(&w[2]),
                            b: end(&w[3]),
                            ips: None,
                            bandwidth: value(&w[4]),
                            delay: value(&w[5]),
                            jitter: None,
                            loss: None,
                            queue: None,
                            queue_bytes: None,
                            a_to_b: None,
                            b_to_a: None,
                        })));
                    }
                    "make-lan" => {
                        if !(4..=5).contains(&w.len()) {
                            return Err(src.error(
                                Syntax,
                                rhs.span.clone(),
                                None,
                                None,
                                "usage: [$ns make-lan \"$a $b ...\" <bandwidth> <delay>]",
                            ));
                        }
                        let members_word = &w[2];
                        let base = members_word.span.start + 1;
                        let inner = members_word.text.as_str();
                        let members = inner
                            .split_whitespace()
                            .map(|m| {
                                let start = base + (m.as_ptr() as usize - inner.as_ptr() as usize);
                                Spanned::new(
                                    start..start + m.len(),
                                    node_name(m.trim_start_matches('$')),
                                )
                            })
                            .collect();
                        vars.insert(var.clone(), Var::Net(nets.len()));
                        nets.push(Net::Lan(Box::new(RawLan {
                            name: Spanned::new(cmd[1].span.clone(), node_name(&var)),
                            members: Spanned::new(members_word.span.clone(), members),
                            ips: None,
                            bandwidth: value(&w[3]),
                            delay: w.get(4).and_then(value),
                            jitter: None,
                            loss: None,
                            queue: None,
                            queue_bytes: None,
                        })));
                    }
                    _ => return Err(unsupported(&w[1], "simulator command")),
                }
            }
            "tb-set-link-loss" | "tb-set-lan-loss" => {
                arity(&cmd, 3, &format!("{} $net <loss>", head.text))?;
                let net = net_of(&cmd[1], &vars, src)?;
                match &mut nets[net] {
                    Net::Lan(l) => l.loss = number(&cmd[2]),
                    Net::Link(l) => l.loss = number(&cmd[2]),
                }
            }
            "tb-set-node-startcmd" => {
                arity(&cmd, 3, "tb-set-node-startcmd $node \"command\"")?;
                let n = node_of(&cmd[1], &vars, src)?;
                nodes[n]
                    .run
                    .push(Spanned::new(cmd[2].span.clone(), cmd[2].text.clone()));
            }
            "tb-set-ip-link" | "tb-set-ip-lan" => {
                arity(&cmd, 4, &format!("{} $node $net <address>", head.text))?;
                let n = node_of(&cmd[1], &vars, src)?;
                let net = net_of(&cmd[2], &vars, src)?;
                ips.insert((net, nodes[n].name.get_ref().clone()), cmd[3].clone());
            }
            "tb-set-link-simplex-params" => {
                arity(
                    &cmd,
                    6,
                    "tb-set-link-simplex-params $link $src <delay> <bandwidth> <loss>",
                )?;
                let net = net_of(&cmd[1], &vars, src)?;
                let from = node_of(&cmd[2], &vars, src)?;
                let from = nodes[from].name.get_ref().clone();
                let Net::Link(l) = &mut nets[net] else {
                    return Err(unsupported(&cmd[1], "simplex params on a lan"));
                };
                let params = RawParams {
                    delay: value(&cmd[3]),
                    bandwidth: value(&cmd[4]),
                    loss: number(&cmd[5]),
                    ..RawParams::default()
                };
                if *l.a.get_ref() == from {
                    l.a_to_b = Some(params);
                } else if *l.b.get_ref() == from {
                    l.b_to_a = Some(params);
                } else {
                    return Err(src.error(
                        UnknownNode,
                        cmd[2].span.clone(),
                        Some(format!("link \"{}\"", l.name.get_ref())),
                        Some("src"),
                        format!("node \"{from}\" is not an end of the link"),
                    ));
                }
            }
            other if IGNORED_PER_NODE.contains(&other) => {
                arity(&cmd, 3, &format!("{other} $node <value>"))?;
                node_of(&cmd[1], &vars, src)?;
            }
            other if IGNORED.contains(&other) => {}
            _ if var_of(head).is_some_and(|v| matches!(vars.get(v), Some(Var::Simulator))) => {
                // `$ns rtproto Static`, `$ns run`: no topology in them.
                if !cmd
                    .get(1)
                    .is_some_and(|w| matches!(w.text.as_str(), "rtproto" | "run"))
                {
                    return Err(unsupported(cmd.get(1).unwrap_or(head), "simulator command"));
                }
            }
            _ => return Err(unsupported(head, "command")),
        }
    }

    // Addresses: all members of a network or none.
    for (k, net) in nets.iter_mut().enumerate() {
        let (members, slot, span): (Vec<String>, &mut Ips, Range<usize>) = match net {
            Net::Lan(l) => (
                l.members
                    .get_ref()
                    .iter()
                    .map(|m| m.get_ref().clone())
                    .collect(),
                &mut l.ips,
                l.name.span(),
            ),
            Net::Link(l) => (
                vec![l.a.get_ref().clone(), l.b.get_ref().clone()],
                &mut l.ips,
                l.name.span(),
            ),
        };
        let given: Vec<Option<&Word>> = members.iter().map(|m| ips.get(&(k, m.clone()))).collect();
        if given.iter().all(Option::is_none) {
            continue;
        }
        let mut list = Vec::new();
        for (m, w) in members.iter().zip(&given) {
            let Some(w) = w else {
                return Err(src.error(
                    BadAddress,
                    span,
                    None,
                    Some("tb-set-ip"),
                    format!("addresses are set for some members but not for \"{m}\""),
                ));
            };
            list.push(Spanned::new(w.span.clone(), w.text.clone()));
        }
        *slot = Some(Spanned::new(span, list));
    }

    let (mut lan, mut link) = (Vec::new(), Vec::new());
    for net in nets {
        match net {
            Net::Lan(l) => lan.push(*l),
            Net::Link(l) => link.push(*l),
        }
    }
    Ok(RawSpec {
        name: Some(Spanned::new(0..0, name)),
        defaults: None,
        nic: None,
        node: nodes,
        lan,
        link,
        host: Vec::new(),
        delay: None,
    })
}

fn var_of(w: &Word) -> Option<&str> {
    w.text.strip_prefix('$')
}

fn node_of(w: &Word, vars: &BTreeMap<String, Var>, src: &Source) -> Result<usize, SpecError> {
    match w.text.strip_prefix('$').and_then(|v| vars.get(v)) {
        Some(Var::Node(i)) => Ok(*i),
        _ => Err(src.error(
            SpecErrorKind::UnknownNode,
            w.span.clone(),
            None,
            None,
            format!("`{}` is not a node", w.text),
        )),
    }
}

fn net_of(w: &Word, vars: &BTreeMap<String, Var>, src: &Source) -> Result<usize, SpecError> {
    match w.text.strip_prefix('$').and_then(|v| vars.get(v)) {
        Some(Var::Net(i)) => Ok(*i),
        _ => Err(src.error(
            SpecErrorKind::UnknownNode,
            w.span.clone(),
            None,
            None,
            format!("`{}` is not a lan or link", w.text),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Experiment, SpecErrorKind};
    use proptest::prelude::*;
    use std::path::Path;

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
[[node]]
name = "nodea"
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

    fn ns(text: &str) -> Result<Experiment, super::SpecError> {
        Experiment::from_ns_script(text, Some(Path::new("dir/three.ns")))
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
        assert_eq!(
            Experiment::from_ns_script("set ns [new Simulator]\nset a [$ns node]\n", None)
                .unwrap()
                .name,
            "ns-import"
        );
    }

    fn refused(text: &str, kind: SpecErrorKind, line: usize, needles: &[&str]) {
        let e = ns(text).expect_err("refused");
        let msg = e.to_string();
        assert_eq!(e.kind, kind, "{msg}");
        assert!(msg.starts_with(&format!("dir/three.ns:{line}:")), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "{msg:?} lacks {n:?}");
        }
    }

    const HEAD: &str = "set ns [new Simulator]\nset a [$ns node]\nset b [$ns node]\n";

    #[test]
    fn refusals_point_into_the_script() {
        refused(
            &format!("{HEAD}tb-set-magic $a 1\n"),
            SpecErrorKind::Unsupported,
            4,
            &["tb-set-magic"],
        );
        refused(
            &format!("{HEAD}set l [$ns duplex-link $a $z 10Mb 5ms DropTail]\n"),
            SpecErrorKind::UnknownNode,
            4,
            &["unknown node \"z\"", "in field b"],
        );
        refused(
            &format!("{HEAD}set l [$ns duplex-link $a $b 10Xb 5ms DropTail]\n"),
            SpecErrorKind::BadUnit,
            4,
            &["Xb", "in field bandwidth"],
        );
        refused(
            &format!("{HEAD}set l [$ns duplex-link $a $b 10Mb 5ms RED]\n"),
            SpecErrorKind::Unsupported,
            4,
            &["RED"],
        );
        refused(
            &format!("{HEAD}set l [$ns make-lan \"$a $b $a\" 10Mb 0ms]\n"),
            SpecErrorKind::DuplicateMember,
            4,
            &["twice"],
        );
        refused(
            &format!("{HEAD}set l [$ns node\n"),
            SpecErrorKind::Syntax,
            4,
            &["unclosed"],
        );
        refused(
            &format!("{HEAD}set l [$ns duplex-link $a $b 10Mb 5ms]\ntb-set-link-loss $l 2\n"),
            SpecErrorKind::OutOfRange,
            5,
            &["in field loss"],
        );
        refused(
            &format!(
                "{HEAD}set l [$ns duplex-link $a $b 10Mb 5ms]\ntb-set-ip-link $a $l 10.1.1.1\n"
            ),
            SpecErrorKind::BadAddress,
            4,
            &["\"b\""],
        );
        refused(
            &format!("{HEAD}tb-set-link-loss $a 0.1\n"),
            SpecErrorKind::UnknownNode,
            4,
            &["not a lan or link"],
        );
        refused("set ns [new Simulator]\n", SpecErrorKind::Empty, 1, &[]);
    }

    /// The demo's script (issue 7), exactly as given there.
    const GEC8: &str = include_str!("../../../../examples/gec8.ns");

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
        assert!(e.nodes.iter().all(|n| n.run.is_empty()));
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
        gec8_refused(10, "tb-set-node-os $nodeC STASIS", "tb-set-node-colour $nodeC red", "tb-set-node-colour", Unsupported, "`tb-set-node-colour`");
        gec8_refused(12, "$ns run", "$ns runn", "runn", Unsupported, "`runn`");
        // Undefined nodes: in a LAN, and in a per-node setting.
        gec8_refused(7, "$nodeD\"", "$nodeE\"", "$nodeE", UnknownNode, "unknown node \"nodee\"");
        gec8_refused(11, "$nodeD STASIS", "$nodeX STASIS", "$nodeX", UnknownNode, "`$nodeX` is not a node");
        // Bad bandwidth unit, and a bad delay unit.
        gec8_refused(7, "1000Mb", "1000Xb", "1000Xb", BadUnit, "in field bandwidth");
        gec8_refused(7, " 0ms]", " 0mz]", "0mz", BadUnit, "in field delay");
    }

    #[test]
    fn documented_script_imports() {
        let doc = include_str!("../../../../docs/spec.md");
        let start = doc.find("```tcl\n").expect("a tcl block") + "```tcl\n".len();
        let text = &doc[start..start + doc[start..].find("```").unwrap()];
        let e =
            Experiment::from_ns_script(text, None).unwrap_or_else(|e| panic!("docs/spec.md: {e}"));
        assert_eq!((e.nodes.len(), e.lans.len(), e.links.len()), (2, 1, 1));
        assert_eq!(e.links[0].b_to_a.loss, 0.25);
        assert_eq!(e.links[0].a_to_b.loss, 0.01);
        assert_eq!(e.node("nodea").unwrap().run, ["stasis-probe --node a"]);
    }

    proptest! {
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
                let _ = Experiment::from_ns_script(&text, Some(Path::new("m.ns")));
            }
        }
    }
}
