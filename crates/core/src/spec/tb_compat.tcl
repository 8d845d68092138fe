# stasis's tb_compat: evaluates an Emulab NS script with a real Tcl
# interpreter and records the topology it builds, the way Emulab's own
# parser does (ns2ir: the script runs, Simulator methods and tb-* commands
# record what they are asked; `set` is wrapped to learn the variable each
# node, LAN and link is stored in, ARRAY(INDEX) naming ARRAY-INDEX).
#
# Run as `tclsh tb_compat.tcl SCRIPT COMMAND_LIMIT SECONDS`. The script runs
# in a safe interpreter (no files, no exec, no sockets) with a command-count
# and a time limit. Everything it records is printed as one JSON document on
# stdout; stasis (crates/core/src/spec/ns.rs) checks it like a TOML spec.
# Each record carries where it was made: the line of the innermost command
# of SCRIPT that was executing and that command's text as written (Tcl's
# `info frame`, TIP 280), so refusals point at file:line:column.
#
# Output: {"records":[R...],"objects":[O...],"error":E|null}
#   R = {"op":NAME,"target":HANDLE|null,"created":HANDLE|null,
#        "args":[STRING...],"argw":WORD,"line":N,"cmd":TEXT}
#       argw: the index in the command's words of args[0]
#   O = {"h":HANDLE,"kind":"sim"|"node"|"lan"|"link","name":VAR|null,"line":N,"cmd":TEXT}
#       line/cmd: the `set` that named it, else where it was made
#       op "!refuse": an unknown command or a `source`; args [MESSAGE]
#   E = {"message":TEXT,"line":N}                           (a Tcl error or a limit)

fconfigure stdout -encoding utf-8 -translation lf

set script [lindex $argv 0]
set command_limit [lindex $argv 1]
set seconds [lindex $argv 2]

set json_map {\\ \\\\ \" \\\"}
for {set c 0} {$c < 32} {incr c} {
    lappend json_map [format %c $c] [format \\u%04x $c]
}
proc json {s} { return "\"[string map $::json_map $s]\"" }
proc json_or_null {s} { expr {$s eq "" ? "null" : [json $s]} }

set records {}
set objects {}      ;# handle -> {kind name line cmd}
set order {}        ;# handles in creation order
set nobj 0

set s [interp create -safe]

# Where the script is: [list line cmd] of its innermost command being run.
proc here {} { $::s eval ::__here }

proc obj {kind} {
    set h _o[incr ::nobj]
    lassign [here] line cmd
    dict set ::objects $h [list $kind "" $line $cmd]
    lappend ::order $h
    interp alias $::s $h {} method $h
    return $h
}

proc record {op target created argw arglist} {
    lassign [here] line cmd
    set a {}
    foreach x $arglist { lappend a [json $x] }
    lappend ::records "{\"op\":[json $op],\"target\":[json_or_null $target],\"created\":[json_or_null $created],\"args\":\[[join $a ,]\],\"argw\":$argw,\"line\":$line,\"cmd\":[json $cmd]}"
}

# A refusal is a record too (op "!refuse", args [MESSAGE], argw the word it
# is about), so it stands even if the script catches the error.
proc refuse {message word} {
    record !refuse "" "" $word [list $message]
    return -code error $message
}

# `new Simulator`; any other class is recorded and refused by stasis.
proc new {args} {
    set created ""
    if {[lindex $args 0] eq "Simulator"} { set created [obj sim] }
    record new "" $created 1 $args
    return $created
}

# $ns node / duplex-link / make-lan make objects; every method call is recorded.
proc method {h args} {
    set m [lindex $args 0]
    set created ""
    if {[lindex [dict get $::objects $h] 0] eq "sim"} {
        switch -- $m {
            node { set created [obj node] }
            duplex-link { set created [obj link] }
            make-lan { set created [obj lan] }
        }
    }
    record $m $h $created 2 [lrange $args 1 end]
    return $created
}

# tb-* commands: recorded; stasis decides which it supports.
proc tb {args} {
    record [lindex $args 0] "" "" 1 [lrange $args 1 end]
    return ""
}

# `set VAR VALUE` where VALUE is an object not yet named: VAR names it.
proc name {var h} {
    if {![dict exists $::objects $h]} { return }
    lassign [dict get $::objects $h] kind old
    if {$old ne ""} { return }
    lassign [here] line cmd
    dict set ::objects $h [list $kind $var $line $cmd]
}

interp alias $s new {} new
interp alias $s __tb {} tb
interp alias $s __name {} name
interp alias $s __refuse {} refuse

# Frames of the script itself: type "source" and its file (this file's own
# procs are "source" frames too, of this file).
$s eval [list proc ::__here {} [string map [list @SCRIPT@ [list $script]] {
    for {set l [info frame]} {$l >= 1} {incr l -1} {
        set f [info frame $l]
        if {[dict get $f type] eq "source" && [string equal [dict get $f file] @SCRIPT@]} {
            return [list [dict get $f line] [dict get $f cmd]]
        }
    }
    return [list 0 ""]
}]]
$s eval {
    rename ::set ::__tcl_set
    proc ::set {var args} {
        if {[llength $args] == 0} { return [uplevel 1 [list ::__tcl_set $var]] }
        if {[llength $args] > 1} { return -code error {wrong # args: should be "set varName ?newValue?"} }
        ::__tcl_set v [uplevel 1 [list ::__tcl_set $var [lindex $args 0]]]
        if {[string match _o* $v]} { ::__name [string trimleft $var :] $v }
        return $v
    }
    proc ::unknown {args} {
        if {[string match tb-* [lindex $args 0]]} { return [::__tb {*}$args] }
        ::__refuse "unsupported NS command `[lindex $args 0]`" 0
    }
    # `source tb_compat.tcl` (Emulab's own line) is this file; nothing else can be read.
    proc ::source {args} {
        if {[llength $args] == 1 && [regexp {(^|/)tb_compat\.tcl$} [lindex $args 0]]} { return }
        ::__refuse "source: an NS script for stasis is one self-contained file" 1
    }
    # Scripts print progress; there is no console to print to.
    proc ::puts {args} {}
}

interp limit $s commands -value $command_limit
interp limit $s time -seconds [expr {[clock seconds] + $seconds}]

set error null
if {[catch {interp invokehidden $s source -encoding utf-8 $script} message]} {
    set line 0
    # The innermost place in the script: `(file "SCRIPT" line N)`.
    set needle "(file \"$script\" line "
    set at [string first $needle $::errorInfo]
    if {$at >= 0} {
        scan [string range $::errorInfo [expr {$at + [string length $needle]}] end] %d line
    }
    set error "{\"message\":[json $message],\"line\":$line}"
}

set objs {}
foreach h $order {
    lassign [dict get $objects $h] kind name line cmd
    lappend objs "{\"h\":[json $h],\"kind\":[json $kind],\"name\":[json_or_null $name],\"line\":$line,\"cmd\":[json $cmd]}"
}
puts "{\"records\":\[[join $records ,\n]\],\"objects\":\[[join $objs ,\n]\],\"error\":$error}"
exit 0
