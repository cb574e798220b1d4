# bash completion for rackwire (the operator CLI) and rackwired (the agent).
# Installed as /usr/share/bash-completion/completions/rackwire and, as a
# symlink, .../rackwired. Subcommands follow docs and `rackwire --help`.

_rackwire() {
	local cur prev words cword
	if declare -F _init_completion >/dev/null; then
		_init_completion || return
	else
		cur=${COMP_WORDS[COMP_CWORD]}
		prev=${COMP_WORDS[COMP_CWORD - 1]}
		words=("${COMP_WORDS[@]}")
		cword=$COMP_CWORD
	fi
	case "$prev" in
	--socket | --netns) COMPREPLY=($(compgen -f -- "$cur")); return ;;
	--type) COMPREPLY=($(compgen -W "drop trace" -- "$cur")); return ;;
	esac
	local top="status endpoint identity policy bpf monitor bgp node help"
	local sub=""
	case "${words[1]}" in
	endpoint) sub="add list get delete" ;;
	identity) sub="list get" ;;
	policy) sub="import list get delete trace" ;;
	bpf)
		case "${words[2]}" in
		policy) sub="get allow-all" ;;
		ipcache) sub="get list" ;;
		ct) sub="list" ;;
		*) sub="policy ipcache ct metrics" ;;
		esac
		;;
	bgp) sub="status render drain undrain" ;;
	node) sub="list" ;;
	esac
	if [ "$cword" -eq 1 ]; then
		COMPREPLY=($(compgen -W "$top --socket --json --help" -- "$cur"))
	elif [ "${words[1]}" = policy ] && [ "${words[2]}" = import ] && [ "$cword" -eq 3 ]; then
		COMPREPLY=($(compgen -f -- "$cur"))
	elif [[ "$cur" == -* ]]; then
		COMPREPLY=($(compgen -W "--json --socket --help --name --netns --labels --ip --src --dst --dport --revert --type --ipv6 --version" -- "$cur"))
	else
		COMPREPLY=($(compgen -W "$sub" -- "$cur"))
	fi
}

_rackwired() {
	local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
	if [ "$prev" = --config ]; then
		COMPREPLY=($(compgen -f -- "$cur"))
	elif [ "$COMP_CWORD" -eq 1 ]; then
		COMPREPLY=($(compgen -W "check-config prestart cleanup --config --version --help" -- "$cur"))
	else
		COMPREPLY=($(compgen -W "--config --help" -- "$cur"))
	fi
}

complete -F _rackwire rackwire
complete -F _rackwired rackwired
