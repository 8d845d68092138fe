//! Emulab NS scripts, evaluated by a real Tcl interpreter the way Emulab's
//! own parser runs them: `tclsh` runs `tb_compat.tcl` (this directory), which
//! evaluates the script in a safe interpreter (no files, no exec, no sockets,
//! a command-count and a time limit) and records every Simulator method and
//! `tb-*` command with the line and text of the command that made it. So
//! variables, arrays, `for`/`foreach`, `append`, `expr` and `proc` work as in
//! Tcl. The records become the same raw spec a TOML file would, with spans
//! into the script, so they are checked by the same rules and every refusal
//! points at `file:line:column` of the script.
//!
//! Names are Emulab's: a node, LAN or link is named after the variable it is
//! first stored in (`set` is wrapped to learn it), `ARRAY(INDEX)` as
//! `ARRAY-INDEX`, lower-cased, `_` as `-`.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Spanned;

use super::{RawLan, RawLink, RawNode, RawParams, RawSpec, Source, SpecError, SpecErrorKind};

/// The shim `tclsh` runs.
const TB_COMPAT: &str = include_str!("tb_compat.tcl");
/// Environment variable naming the Tcl shell (default `tclsh`, Debian's `tcl`).
pub const ENV_TCLSH: &str = "STASIS_TCLSH";
/// Tcl commands a script may run (loops included) before it is stopped.
const COMMAND_LIMIT: u64 = 20_000_000;
/// Seconds of evaluation before the interpreter stops the script.
const TIME_LIMIT_S: u64 = 10;
/// The process is killed if it runs this long (the limits above failed).
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest record document accepted from the interpreter.
const MAX_OUTPUT: u64 = 64 << 20;
/// Largest script accepted.
pub const MAX_SCRIPT: usize = 4 << 20;
/// Address space of the interpreter process.
const MEMORY_LIMIT: u64 = 2 << 30;

type Ips = Option<Spanned<Vec<Spanned<String>>>>;

/// What the shim prints (see the top of `tb_compat.tcl`).
#[derive(Debug, Deserialize)]
struct Output {
    records: Vec<Record>,
    objects: Vec<Object>,
    error: Option<TclError>,
}

#[derive(Debug, Deserialize)]
struct Record {
    op: String,
    target: Option<String>,
    created: Option<String>,
    args: Vec<String>,
    /// The word index of `args[0]` in `cmd`.
    argw: usize,
    line: usize,
    cmd: String,
}

#[derive(Debug, Deserialize)]
struct Object {
    h: String,
    kind: String,
    name: Option<String>,
    line: usize,
    cmd: String,
}

#[derive(Debug, Deserialize)]
struct TclError {
    message: String,
    line: usize,
}

/// Runs the interpreter on `text` and returns what it printed (the records).
fn evaluate(text: &str, src: &Source) -> Result<Vec<u8>, SpecError> {
    let fail = |kind, message: String| SpecError {
        kind,
        file: src.file.clone(),
        line: 0,
        column: 0,
        subject: None,
        field: None,
        message,
        source: None,
    };
    if text.len() > MAX_SCRIPT {
        return Err(fail(SpecErrorKind::TooMany, format!("the script is larger than {} MiB", MAX_SCRIPT >> 20)));
    }
    let interp = |e: std::io::Error, what: &str| {
        let mut err = fail(SpecErrorKind::Interpreter, format!("cannot {what} the Tcl interpreter"));
        err.source = Some(e);
        err
    };
    // The script is evaluated from a private copy: the text given may not be
    // what is on disk, and Tcl reports lines of the file it sourced.
    let dir = tempfile::Builder::new().prefix("stasis-ns-").tempdir().map_err(|e| interp(e, "prepare"))?;
    let shim = dir.path().join("tb_compat.tcl");
    let script = dir.path().join("script.ns");
    std::fs::write(&shim, TB_COMPAT).map_err(|e| interp(e, "prepare"))?;
    std::fs::write(&script, text).map_err(|e| interp(e, "prepare"))?;
    let tclsh = std::env::var_os(ENV_TCLSH).unwrap_or_else(|| "tclsh".into());
    let mut cmd = Command::new(&tclsh);
    cmd.arg(&shim)
        .arg(&script)
        .arg(COMMAND_LIMIT.to_string())
        .arg(TIME_LIMIT_S.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    limit_memory(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        let mut err = interp(e, "start");
        err.message = format!(
            "cannot run {} to evaluate the NS script (install Debian's `tcl` package, or set {ENV_TCLSH})",
            PathBuf::from(&tclsh).display()
        );
        err
    })?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let r = (&mut stdout).take(MAX_OUTPUT + 1).read_to_end(&mut out);
        r.map(|_| out)
    });
    let err_reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut out);
        out
    });
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait().map_err(|e| interp(e, "wait for"))? {
            Some(s) => break s,
            None if t0.elapsed() > PROCESS_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(
                    SpecErrorKind::Interpreter,
                    format!("the Tcl interpreter did not finish within {PROCESS_TIMEOUT:?}"),
                ));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let out = reader.join().expect("reader").map_err(|e| interp(e, "read"))?;
    let errtext = String::from_utf8_lossy(&err_reader.join().expect("reader")).trim().to_owned();
    if !status.success() {
        return Err(fail(SpecErrorKind::Interpreter, format!("the Tcl interpreter failed ({status}): {errtext}")));
    }
    if out.len() as u64 > MAX_OUTPUT {
        return Err(fail(
            SpecErrorKind::TooMany,
            format!("the script recorded more than {} MiB of topology", MAX_OUTPUT >> 20),
        ));
    }
    Ok(out)
}

/// Caps the interpreter's address space, so a script building a huge string
/// fails there instead of filling the machine's memory.
fn limit_memory(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit { rlim_cur: MEMORY_LIMIT, rlim_max: MEMORY_LIMIT };
    // SAFETY: setrlimit is async-signal-safe and only reads `limit`, a plain
    // value copied into the closure; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One Tcl word of a command's text and where it is in that text.
#[derive(Debug, Clone)]
struct Word {
    span: Range<usize>,
}

/// Splits one command's text into words (quoted, braced, bracketed, bare),
/// for placing errors on the word they are about.
fn words(text: &str) -> Vec<Word> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'\\' if bytes.get(i + 1) == Some(&b'\n') => i += 2,
            c => {
                let start = i;
                if matches!(c, b'"' | b'{' | b'[') {
                    let close = match c {
                        b'"' => b'"',
                        b'{' => b'}',
                        _ => b']',
                    };
                    let mut depth = 1;
                    i += 1;
                    while i < bytes.len() && depth > 0 {
                        if bytes[i] == b'\\' {
                            i += 2;
                            continue;
                        }
                        if bytes[i] == close {
                            depth -= 1;
                        } else if bytes[i] == c && c != b'"' {
                            depth += 1;
                        }
                        i += 1;
                    }
                }
                while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t' | b'\r' | b'\n') {
                    if bytes[i] == b'\\' {
                        i += 1;
                    } else if bytes[i] == b'[' {
                        // A bracket inside a bare word: skip to its end.
                        let mut depth = 0;
                        while i < bytes.len() {
                            match bytes[i] {
                                b'[' => depth += 1,
                                b']' => {
                                    depth -= 1;
                                    if depth == 0 {
                                        break;
                                    }
                                }
                                _ => {}
                            }
                            i += 1;
                        }
                    }
                    i += 1;
                }
                let mut end = i.min(bytes.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                i = end;
                out.push(Word { span: start..end });
            }
        }
    }
    out
}

/// Places records in the script: byte spans from (line, command text, word).
struct Locator<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Locator { text, line_starts }
    }

    fn line_range(&self, line: usize) -> Option<Range<usize>> {
        let start = *self.line_starts.get(line.checked_sub(1)?)?;
        let end = self.text[start..].find('\n').map_or(self.text.len(), |i| start + i);
        Some(start..end)
    }

    /// The first non-blank character of `line`, or the start of the text.
    fn line_start(&self, line: usize) -> Range<usize> {
        match self.line_range(line) {
            Some(r) => {
                let indent = self.text[r.clone()].len() - self.text[r.clone()].trim_start().len();
                r.start + indent..(r.start + indent + 1).min(r.end.max(r.start + indent))
            }
            None => 0..0,
        }
    }

    /// Where command text `cmd` (starting on `line`) begins in the script.
    fn command(&self, line: usize, cmd: &str) -> Option<usize> {
        let r = self.line_range(line)?;
        if cmd.is_empty() {
            return None;
        }
        let first = cmd.lines().next().unwrap_or(cmd);
        let at = self.text[r.clone()].find(first)? + r.start;
        self.text[at..].starts_with(cmd).then_some(at)
    }

    /// The span of word `word` of command `cmd` on `line`; the command's
    /// start when the word cannot be found (an expanded `{*}` list), the
    /// line's start when the command cannot.
    fn word(&self, line: usize, cmd: &str, word: usize) -> Range<usize> {
        let Some(at) = self.command(line, cmd) else {
            return self.line_start(line);
        };
        match words(cmd).get(word) {
            Some(w) => w.span.start + at..w.span.end + at,
            None => at..at + 1,
        }
    }

    /// Where a Tcl error on `line` is: the variable it could not read, or
    /// the line's first character.
    fn tcl_error(&self, line: usize, message: &str) -> Range<usize> {
        let var = message
            .strip_prefix("can't read \"")
            .and_then(|m| m.split('"').next())
            .map(|v| v.split('(').next().unwrap_or(v));
        if let (Some(var), Some(r)) = (var, self.line_range(line)) {
            for needle in [format!("${var}"), format!("${{{var}}}")] {
                if let Some(i) = self.text[r.clone()].find(&needle) {
                    return r.start + i..r.start + i + needle.len();
                }
            }
        }
        self.line_start(line)
    }
}

/// Emulab names are hostnames: `ARRAY(INDEX)` → `ARRAY-INDEX`, lower case, `-` for `_`.
fn object_name(var: &str) -> String {
    var.trim_start_matches(':')
        .replace('(', "-")
        .replace([')'], "")
        .replace(',', "-")
        .to_ascii_lowercase()
        .replace('_', "-")
}

fn value(span: Range<usize>, text: &str) -> Option<Spanned<toml::Value>> {
    Some(Spanned::new(span, toml::Value::String(text.to_owned())))
}

fn number(span: Range<usize>, text: &str) -> Option<Spanned<toml::Value>> {
    let v = match text.trim().parse::<f64>() {
        Ok(x) => toml::Value::Float(x),
        Err(_) => toml::Value::String(text.to_owned()),
    };
    Some(Spanned::new(span, v))
}

enum Net {
    Lan(Box<RawLan>),
    Link(Box<RawLink>),
}

/// What a handle (`_o3`) stands for once the records are read.
#[derive(Clone, Copy)]
enum Obj {
    Sim,
    Node(usize),
    Net(usize),
    Other,
}

/// Testbed settings of one node: nothing to emulate, but the node must exist.
const IGNORED_PER_NODE: &[&str] = &["tb-set-hardware", "tb-set-node-failure-action"];

/// Testbed-wide settings with nothing to emulate.
const IGNORED: &[&str] = &[
    "tb-use-endnodeshaping",
    "tb-set-sync-server",
    "tb-set-colocate-factor",
    "tb-set-noshaping",
    "tb-set-endnodeshaping",
];

/// Evaluates an NS script into the raw spec.
pub(super) fn parse(text: &str, src: &Source, name: String) -> Result<RawSpec, SpecError> {
    records(&evaluate(text, src)?, text, src, name)
}

/// The raw spec from what the interpreter printed about `text`.
pub(super) fn records(printed: &[u8], text: &str, src: &Source, name: String) -> Result<RawSpec, SpecError> {
    use SpecErrorKind::*;
    let out: Output = serde_json::from_slice(printed).map_err(|e| SpecError {
        kind: Interpreter,
        file: src.file.clone(),
        line: 0,
        column: 0,
        subject: None,
        field: None,
        message: format!("the Tcl interpreter's records do not parse ({e})"),
        source: None,
    })?;
    let loc = Locator::new(text);
    let err = |kind, span: Range<usize>, message: String| src.error(kind, span, None, None, message);

    // Objects: their kinds and names.
    let mut objs: BTreeMap<&str, Obj> = BTreeMap::new();
    let mut nodes: Vec<RawNode> = Vec::new();
    let mut nets: Vec<Option<Net>> = Vec::new();
    let mut net_names: Vec<Spanned<String>> = Vec::new();
    for o in &out.objects {
        let obj = match o.kind.as_str() {
            "sim" => Obj::Sim,
            "node" | "lan" | "link" => {
                let Some(var) = &o.name else {
                    return Err(err(
                        Syntax,
                        loc.line_start(o.line),
                        format!(
                            "this {} is not stored in a variable (`set NAME [$ns ...]`): \
                             its name would be the variable's",
                            o.kind
                        ),
                    ));
                };
                let name = Spanned::new(loc.word(o.line, &o.cmd, 1), object_name(var));
                if o.kind == "node" {
                    nodes.push(RawNode::named(name));
                    Obj::Node(nodes.len() - 1)
                } else {
                    net_names.push(name);
                    Obj::Net(net_names.len() - 1)
                }
            }
            _ => Obj::Other,
        };
        objs.insert(&o.h, obj);
    }

    // (network index, node name) → address, from tb-set-ip-link/lan.
    let mut ips: BTreeMap<(usize, String), Spanned<String>> = BTreeMap::new();
    for r in &out.records {
        let span = |i: usize| loc.word(r.line, &r.cmd, r.argw + i);
        let head = || loc.word(r.line, &r.cmd, r.argw.saturating_sub(1));
        let unsupported = |what: &str, name: &str| err(Unsupported, head(), format!("unsupported NS {what} `{name}`"));
        let arity = |n: &[usize], usage: &str| -> Result<(), SpecError> {
            if n.contains(&r.args.len()) {
                Ok(())
            } else {
                Err(err(Syntax, head(), format!("usage: {usage}")))
            }
        };
        let node_of = |i: usize| -> Result<usize, SpecError> {
            match r.args.get(i).and_then(|a| objs.get(a.as_str())) {
                Some(Obj::Node(n)) => Ok(*n),
                _ => Err(err(
                    UnknownNode,
                    span(i),
                    format!("`{}` is not a node", r.args.get(i).map_or("", String::as_str)),
                )),
            }
        };
        let net_of = |i: usize| -> Result<usize, SpecError> {
            match r.args.get(i).and_then(|a| objs.get(a.as_str())) {
                Some(Obj::Net(n)) => Ok(*n),
                _ => Err(err(
                    UnknownNode,
                    span(i),
                    format!("`{}` is not a lan or link", r.args.get(i).map_or("", String::as_str)),
                )),
            }
        };
        let target = r.target.as_deref().and_then(|t| objs.get(t).copied());
        match (target, r.op.as_str()) {
            (None, "!refuse") => {
                let message = r.args.first().cloned().unwrap_or_default();
                return Err(err(Unsupported, loc.word(r.line, &r.cmd, r.argw), message));
            }
            (None, "new") => {
                if r.args.first().map(String::as_str) != Some("Simulator") {
                    return Err(unsupported("object", r.args.first().map_or("", String::as_str)));
                }
            }
            (Some(Obj::Sim), "node") => arity(&[0], "[$ns node]")?,
            (Some(Obj::Sim), "duplex-link") => {
                arity(&[4, 5], "[$ns duplex-link $a $b <bandwidth> <delay> [DropTail]]")?;
                if r.args.get(4).is_some_and(|q| q != "DropTail") {
                    return Err(err(
                        Unsupported,
                        span(4),
                        format!("unsupported NS queue discipline (only DropTail) `{}`", r.args[4]),
                    ));
                }
                let a = node_of(0)?;
                let b = node_of(1)?;
                let net = created_net(&objs, r)?;
                nets_insert(
                    &mut nets,
                    net,
                    Net::Link(Box::new(RawLink {
                        name: net_names[net].clone(),
                        a: Spanned::new(span(0), nodes[a].name.get_ref().clone()),
                        b: Spanned::new(span(1), nodes[b].name.get_ref().clone()),
                        ips: None,
                        bandwidth: value(span(2), &r.args[2]),
                        delay: value(span(3), &r.args[3]),
                        jitter: None,
                        loss: None,
                        queue: None,
                        queue_bytes: None,
                        a_to_b: None,
                        b_to_a: None,
                    })),
                );
            }
            (Some(Obj::Sim), "make-lan") => {
                arity(&[2, 3], "[$ns make-lan \"$a $b ...\" <bandwidth> <delay>]")?;
                let mut members = Vec::new();
                for m in r.args[0].split_whitespace() {
                    match objs.get(m) {
                        Some(Obj::Node(n)) => members.push(Spanned::new(span(0), nodes[*n].name.get_ref().clone())),
                        _ => {
                            return Err(err(UnknownNode, span(0), format!("`{m}` in the lan's members is not a node")))
                        }
                    }
                }
                let net = created_net(&objs, r)?;
                nets_insert(
                    &mut nets,
                    net,
                    Net::Lan(Box::new(RawLan {
                        name: net_names[net].clone(),
                        members: Spanned::new(span(0), members),
                        ips: None,
                        bandwidth: value(span(1), &r.args[1]),
                        delay: r.args.get(2).and_then(|d| value(span(2), d)),
                        jitter: None,
                        loss: None,
                        queue: None,
                        queue_bytes: None,
                    })),
                );
            }
            // No topology in them.
            (Some(Obj::Sim), "rtproto" | "run") => {}
            (Some(Obj::Sim), m) => return Err(unsupported("simulator command", m)),
            (Some(_), m) => return Err(unsupported("method", m)),
            (None, "tb-set-link-loss" | "tb-set-lan-loss") => {
                arity(&[2], &format!("{} $net <loss>", r.op))?;
                let net = net_of(0)?;
                match nets.get_mut(net).and_then(Option::as_mut) {
                    Some(Net::Lan(l)) => l.loss = number(span(1), &r.args[1]),
                    Some(Net::Link(l)) => l.loss = number(span(1), &r.args[1]),
                    None => return Err(err(UnknownNode, span(0), "the lan or link is not made yet".into())),
                }
            }
            (None, "tb-set-node-startcmd") => {
                arity(&[2], "tb-set-node-startcmd $node \"command\"")?;
                let n = node_of(0)?;
                nodes[n].run.push(Spanned::new(span(1), r.args[1].clone()));
            }
            (None, "tb-set-node-os") => {
                arity(&[2], "tb-set-node-os $node <os>")?;
                let n = node_of(0)?;
                nodes[n].os = Some(Spanned::new(span(1), r.args[1].clone()));
            }
            (None, "tb-set-ip-link" | "tb-set-ip-lan") => {
                arity(&[3], &format!("{} $node $net <address>", r.op))?;
                let n = node_of(0)?;
                let net = net_of(1)?;
                ips.insert((net, nodes[n].name.get_ref().clone()), Spanned::new(span(2), r.args[2].clone()));
            }
            (None, "tb-set-link-simplex-params") => {
                arity(&[5], "tb-set-link-simplex-params $link $src <delay> <bandwidth> <loss>")?;
                let net = net_of(0)?;
                let from = nodes[node_of(1)?].name.get_ref().clone();
                let Some(Net::Link(l)) = nets.get_mut(net).and_then(Option::as_mut) else {
                    return Err(err(Unsupported, span(0), "unsupported NS simplex params on a lan".into()));
                };
                let params = RawParams {
                    delay: value(span(2), &r.args[2]),
                    bandwidth: value(span(3), &r.args[3]),
                    loss: number(span(4), &r.args[4]),
                    ..RawParams::default()
                };
                if *l.a.get_ref() == from {
                    l.a_to_b = Some(params);
                } else if *l.b.get_ref() == from {
                    l.b_to_a = Some(params);
                } else {
                    return Err(src.error(
                        UnknownNode,
                        span(1),
                        Some(format!("link \"{}\"", l.name.get_ref())),
                        Some("src"),
                        format!("node \"{from}\" is not an end of the link"),
                    ));
                }
            }
            (None, op) if IGNORED_PER_NODE.contains(&op) => {
                arity(&[2], &format!("{op} $node <value>"))?;
                node_of(0)?;
            }
            (None, op) if IGNORED.contains(&op) => {}
            (None, op) => return Err(unsupported("command", op)),
        }
    }
    if let Some(e) = &out.error {
        let message = if e.message.contains("limit exceeded") {
            format!("the script was stopped: {} (at most {COMMAND_LIMIT} Tcl commands and {TIME_LIMIT_S} s)", e.message)
        } else {
            format!("Tcl: {}", e.message.replace('\n', " "))
        };
        let span = if e.line > 0 { loc.tcl_error(e.line, &e.message) } else { 0..0 };
        let mut error = err(Script, span, message);
        if e.line == 0 {
            (error.line, error.column) = (0, 0);
        }
        return Err(error);
    }

    // Addresses: all members of a network or none.
    // Networks keep their creation index k (the key of `ips`).
    for (k, net) in nets.iter_mut().enumerate() {
        let Some(net) = net else { continue };
        let (members, slot, span): (Vec<String>, &mut Ips, Range<usize>) = match net {
            Net::Lan(l) => {
                (l.members.get_ref().iter().map(|m| m.get_ref().clone()).collect(), &mut l.ips, l.name.span())
            }
            Net::Link(l) => (vec![l.a.get_ref().clone(), l.b.get_ref().clone()], &mut l.ips, l.name.span()),
        };
        let given: Vec<Option<&Spanned<String>>> = members.iter().map(|m| ips.get(&(k, m.clone()))).collect();
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
            list.push((*w).clone());
        }
        *slot = Some(Spanned::new(span, list));
    }

    let (mut lan, mut link) = (Vec::new(), Vec::new());
    for net in nets.into_iter().flatten() {
        match net {
            Net::Lan(l) => lan.push(*l),
            Net::Link(l) => link.push(*l),
        }
    }
    Ok(RawSpec { name: Some(Spanned::new(0..0, name)), node: nodes, lan, link, ..RawSpec::default() })
}

/// The network index of the object a record created.
fn created_net(objs: &BTreeMap<&str, Obj>, r: &Record) -> Result<usize, SpecError> {
    match r.created.as_deref().and_then(|h| objs.get(h)) {
        Some(Obj::Net(n)) => Ok(*n),
        // The shim always creates one; a record without is not its output.
        _ => Err(SpecError {
            kind: SpecErrorKind::Interpreter,
            file: None,
            line: r.line,
            column: 1,
            subject: None,
            field: None,
            message: format!("the interpreter recorded `{}` without the object it makes", r.op),
            source: None,
        }),
    }
}

/// Networks are numbered in the order they were made, whatever order the
/// records name them in.
fn nets_insert(nets: &mut Vec<Option<Net>>, at: usize, net: Net) {
    if nets.len() <= at {
        nets.resize_with(at + 1, || None);
    }
    nets[at] = Some(net);
}

#[cfg(test)]
mod tests;
