# common.sh: shared by the deb and rpm maintainer scripts (nfpm inlines no
# includes, so build.sh pastes this file at the top of each script).

rw_systemd_running() { [ -d /run/systemd/system ]; }

# rw_setup creates the group and the directories. systemd-sysusers and
# systemd-tmpfiles read the snippets the package ships; hosts without them
# get the same result by hand.
rw_setup() {
	if command -v systemd-sysusers >/dev/null 2>&1; then
		systemd-sysusers rackwire.conf >/dev/null 2>&1 || systemd-sysusers >/dev/null 2>&1 || true
	fi
	if ! getent group rackwire >/dev/null 2>&1; then
		groupadd -r rackwire 2>/dev/null || addgroup --system rackwire >/dev/null 2>&1 || true
	fi
	if rw_systemd_running && command -v systemd-tmpfiles >/dev/null 2>&1; then
		systemd-tmpfiles --create rackwire.conf >/dev/null 2>&1 || true
	fi
	mkdir -p /var/lib/rackwire /etc/rackwire/policies.d
	chmod 0750 /var/lib/rackwire
}

# rw_first_config gives a fresh install a config that loads: the example is
# all comments, i.e. the defaults. An existing file (the operator's, Salt's)
# is never touched; the package does not own the path, so no upgrade or
# dpkg/rpm conffile logic can replace it either.
rw_first_config() {
	if [ ! -e /etc/rackwire/rackwire.toml ] && [ -f /usr/share/doc/rackwire/rackwire.toml.example ]; then
		install -m 0644 /usr/share/doc/rackwire/rackwire.toml.example /etc/rackwire/rackwire.toml.new
		if /usr/sbin/rackwired check-config --config /etc/rackwire/rackwire.toml.new >/dev/null 2>&1; then
			mv /etc/rackwire/rackwire.toml.new /etc/rackwire/rackwire.toml
		else
			rm -f /etc/rackwire/rackwire.toml.new
		fi
	fi
}

# The BIRD integration's drop-in (packaging/systemd/rackwired-bgp.conf):
# CAP_DAC_OVERRIDE and a writable /etc/bird, which the unit alone does not
# grant. rw_bgp_dropin links it when the config enables BGP, so a host that
# used BGP before the unit was hardened keeps it across the upgrade; an
# operator's own file of that name is left alone.
RW_BGP_SRC=/usr/share/rackwire/systemd/rackwired-bgp.conf
RW_BGP_DROPIN=/etc/systemd/system/rackwired.service.d/bgp.conf

# rw_bgp_enabled reports whether /etc/rackwire/rackwire.toml sets [bgp]
# enabled = true: the effective config as the agent reads it, or the file
# itself when it does not load.
rw_bgp_enabled() {
	[ -f /etc/rackwire/rackwire.toml ] || return 1
	{ /usr/sbin/rackwired check-config --config /etc/rackwire/rackwire.toml 2>/dev/null ||
		cat /etc/rackwire/rackwire.toml; } | awk '
		/^[[:space:]]*\[/ { sec = $0; sub(/#.*/, "", sec); gsub(/[[:space:]]/, "", sec) }
		sec == "[bgp]" && /^[[:space:]]*enabled[[:space:]]*=[[:space:]]*true[[:space:]]*(#.*)?$/ { on = 1 }
		END { exit !on }'
}

rw_bgp_dropin() {
	if rw_bgp_enabled && [ ! -e "$RW_BGP_DROPIN" ] && [ ! -L "$RW_BGP_DROPIN" ]; then
		mkdir -p "${RW_BGP_DROPIN%/*}" && ln -s "$RW_BGP_SRC" "$RW_BGP_DROPIN" || true
	fi
}

# rw_bgp_dropin_remove removes that link (never the operator's own file)
# when the package goes: its target goes with it.
rw_bgp_dropin_remove() {
	if [ -L "$RW_BGP_DROPIN" ] && [ "$(readlink "$RW_BGP_DROPIN")" = "$RW_BGP_SRC" ]; then
		rm -f "$RW_BGP_DROPIN"
		rmdir "${RW_BGP_DROPIN%/*}" 2>/dev/null || true
	fi
}

rw_daemon_reload() {
	if rw_systemd_running; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
}

# rw_enable enables the unit for the next boot without starting it: the
# operator or Salt starts it once the config is right. systemctl enable works
# without a running systemd too (image builds, chroots).
rw_enable() {
	if command -v systemctl >/dev/null 2>&1; then
		systemctl enable rackwired.service >/dev/null 2>&1 || true
	fi
}

# rw_try_restart restarts the agent on upgrade only if it was running.
# --no-block: the restart goes through the restart gate, which may wait for
# this host's jitter slot; the package manager must not wait with it.
rw_try_restart() {
	if rw_systemd_running; then
		systemctl --no-block try-restart rackwired.service >/dev/null 2>&1 || true
	fi
}

# rw_stop_disable stops the agent and disables it, on removal only. The
# datapath stays pinned (workloads keep forwarding); `rackwired cleanup`
# removes it, and so does a purge.
rw_stop_disable() {
	# dpkg hands a reinstall after a remove (not a purge) the old version,
	# like an upgrade; this marker in the kept state dir makes postinst
	# treat it as the first install it is (enable again).
	mkdir -p /var/lib/rackwire && : >/var/lib/rackwire/.package-removed
	if rw_systemd_running; then
		systemctl stop rackwired.service >/dev/null 2>&1 || true
	fi
	if command -v systemctl >/dev/null 2>&1; then
		systemctl disable rackwired.service >/dev/null 2>&1 || true
	fi
}

# rw_purge removes what the package or the agent created outside the files
# the package manager tracks: state, runtime dir, the config written by
# rw_first_config or Salt, policies, and the pinned datapath.
rw_purge() {
	# The pin directory: [datapath] pin_dir, read before the config goes,
	# else the default; only ever something below /sys/fs/bpf/.
	pins=$(sed -n 's/^[[:space:]]*pin_dir[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' \
		/etc/rackwire/rackwire.toml 2>/dev/null | head -n 1)
	[ -n "$pins" ] || pins=/sys/fs/bpf/rackwire
	case "$pins" in
	*..*) pins="" ;;
	/sys/fs/bpf/?*) ;;
	*) pins="" ;;
	esac
	rm -rf /var/lib/rackwire /run/rackwire ${pins:+"$pins"}
	rm -f /etc/rackwire/rackwire.toml /etc/rackwire/rackwire.toml.new
	rm -rf /etc/rackwire/policies.d
	rmdir /etc/rackwire 2>/dev/null || true
}
