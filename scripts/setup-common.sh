# Shared by scripts/demo and scripts/run-tests (sourced, not run): optional
# Debian packages and a pip that speaks only when it fails.

# How long apt-get waits for another apt-get or dpkg to release its lock.
APT_LOCK_TIMEOUT=${HBP_APT_LOCK_TIMEOUT:-300}

# install_optional LOG WHY COMMAND[=PACKAGE]...: installs the Debian packages
# of the missing commands (PACKAGE defaults to the command's name) with apt-get
# when running as root; waits for a held dpkg lock; carries on without them
# when that fails.
install_optional() {
    local log=$1 why=$2 missing=() wanted
    shift 2
    for wanted in "$@"; do
        # Daemons live in /usr/sbin, which a user's PATH may lack.
        PATH=$PATH:/usr/sbin command -v "${wanted%%=*}" >/dev/null || missing+=("${wanted#*=}")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "note: ${missing[*]} not installed ($why); carrying on without" >&2
        return 0
    fi
    echo "== installing ${missing[*]} with apt-get ($why; optional;" \
        "waits up to ${APT_LOCK_TIMEOUT} s for another apt-get to finish)"
    local apt=(apt-get -qq -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT")
    "${apt[@]}" update >"$log" 2>&1 || true # stale package lists may still do
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y "${missing[@]}" >>"$log" 2>&1; then
        echo "note: apt-get could not install ${missing[*]}; carrying on without" \
            "(apt-get's output in $log):" >&2
        grep -E '^(E|W):' "$log" | tail -n 3 | sed 's/^/    /' >&2
    fi
}

# quiet_pip LOG PYTHON PIP-ARGUMENT...: runs pip; its output (with the warnings
# that pip's configuration prints for every package) goes to LOG and is shown
# only when pip fails.
quiet_pip() {
    local log=$1 python=$2
    shift 2
    if ! "$python" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1; then
        echo "error: pip $* failed; its output (also in $log):" >&2
        cat "$log" >&2
        return 1
    fi
}
