# Shared by the install scripts under scripts/ (sourced, never run): messages,
# root or sudo, `apt-get update` at most once per run, and apt_install, which
# installs but never removes or downgrades anything the machine has.
# The sourcing script sets WHO (its name, for messages) first.

die() { echo "${WHO:-stasis}: error: $*" >&2; exit 1; }
say() { echo "${WHO:-stasis}: $*"; }
SUDO=
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "not root and sudo is missing"
    SUDO=sudo
fi
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 only"

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        $SUDO apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
}

# apt_install [-t SUITE] PKG...: install, but never remove or downgrade
# anything the machine has. apt is asked first (-s) what it would do; any
# "Remv" line (say, qemu-utils 10.0.2 removed because qemu-system-common 7.2
# Breaks it) stops the set-up with the packages named, before anything changes.
apt_install() {
    local plan removals
    plan=$($SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -s -y --no-install-recommends "$@" 2>&1) \
        || { echo "$plan" | tail -n 20 >&2; die "apt-get cannot install $*"; }
    removals=$(echo "$plan" | awk '/^Remv / { print $2 }' | tr '\n' ' ')
    [ -z "$removals" ] || die "installing $* would remove ${removals}— refusing (install them by hand if that is really wanted)"
    local log
    log=$(mktemp)
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get install $* failed"
    fi
    rm -f "$log"
}

# missing_pkgs PKG...: prints the packages dpkg does not list as installed.
missing_pkgs() {
    local p
    for p in "$@"; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || echo "$p"
    done
}
